"""Kosmos-G training data: construction (caption -> entities -> masks), ingestion of editing
triplets and image-caption pairs, mixing, and the official json + base64 TSV layout.

Native format: WebDataset tar shards (schema: docs/data-format.md). Entry point:
`python -m train.data {build,ingest-ip2p,ingest-pairs,mix,to-official,from-official} --help`.
"""

from .config import BuildConfig, CropConfig, IngestConfig, MixConfig, ModelsConfig, OfficialConfig

__all__ = ["BuildConfig", "CropConfig", "IngestConfig", "MixConfig", "ModelsConfig", "OfficialConfig",
           "Sample", "read_samples", "resolve_shards", "EntityLabel", "LabelSource", "Scene"]

_LAZY = {"Sample": "shards", "read_samples": "shards", "resolve_shards": "shards",
         "EntityLabel": "sources", "LabelSource": "sources", "Scene": "sources"}


def __getattr__(name):  # lazy: `--help` must not import webdataset / torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
