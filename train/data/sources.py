"""Where samples come from.

Two kinds of input feed `build`:
- raw items (`RawItem`): image bytes + an optional caption, from a folder or WebDataset shards;
  the model labeller adds caption / entities / masks;
- label sources (`LabelSource`): something that already knows each scene's caption, entities and
  masks (the nano world, a synthetic renderer, a hand-labelled set) and so replaces the three
  models. `--source nano-world` or `--source package.module:factory` selects one.

Folder layout: images (`.jpg .jpeg .png .webp .bmp`, any depth, sorted by relative path) with an
optional caption in a sidecar `<stem>.txt` (the img2dataset convention) or in a JSONL captions file
(`{"image": "relative/path.jpg", "caption": "..."}` per line).
Shard layout: img2dataset-style WebDataset tars (`jpg|jpeg|png|webp` image, optional `txt` caption
or `json` with a "caption").
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from train.common.config import read_utf8_lines
from train.common.walk import IMAGE_SUFFIXES, files_under

from .shards import iter_records, sanitize_key


@dataclass
class RawItem:
    """One input image. `read()` returns its bytes (lazy: folders are read only when processed)."""

    index: int
    key: str
    origin: str
    read: Callable[[], bytes]
    caption: str | None = None
    caption_error: str | None = None  # why a given caption could not be read: the item is `unreadable_caption`


@dataclass
class EntityLabel:
    """One entity of a labelled scene: its word and either a mask or ready crops.

    mask: [H, W] probabilities in 0..1 (or bool) at the scene image's resolution; it goes through
    the official crop recipe. crop / masked: ready square crops (used as given, resized).
    """

    name: str
    mask: np.ndarray | None = None
    crop: Image.Image | None = None
    masked: Image.Image | None = None


@dataclass
class Scene:
    """A labelled image: what the captioner + LLM + segmenter would have produced."""

    key: str
    image: Image.Image
    caption: str
    entities: list[EntityLabel] = field(default_factory=list)
    origin: str = ""


@runtime_checkable
class LabelSource(Protocol):
    """Random access to labelled scenes; `scene(i)` must depend only on (source settings, seed, i)
    so builds are deterministic and resumable."""

    def __len__(self) -> int: ...

    def scene(self, index: int) -> Scene: ...


@dataclass
class LabelItem:
    """A work item backed by a label source (what the runner iterates for generated data)."""

    index: int
    key: str
    source: LabelSource


def _read_file(path: str) -> Callable[[], bytes]:
    def read() -> bytes:
        with open(path, "rb") as handle:
            return handle.read()
    return read


CAPTION_ENTRY_LAYOUT = '{"image": "relative/path", "caption": "..." or null}'


def is_caption_entry(entry) -> bool:
    """One line of a captions file or a pairs JSONL file: CAPTION_ENTRY_LAYOUT (null: no caption given)."""
    return isinstance(entry, dict) and isinstance(entry.get("image"), str) and \
        isinstance(entry.get("caption"), (str, type(None)))


def _read_captions_file(path: str | None) -> dict[str, str]:
    if not path:
        return {}
    captions = {}
    with open(path, encoding="utf-8-sig") as handle:  # -sig: a byte-order mark (Windows editors) is not JSON
        for number, line in enumerate(read_utf8_lines(handle, f"captions file {path}"), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"captions file {path}:{number}: not a JSON line ({error}); expected "
                                 f"{CAPTION_ENTRY_LAYOUT} per line") from error
            if not is_caption_entry(entry):
                raise ValueError(f"captions file {path}:{number}: {entry!r:.80} is not {CAPTION_ENTRY_LAYOUT}; "
                                 "write one such object per line")
            if entry.get("caption") is not None:  # null: none given (the sidecar .txt or the captioner is used)
                captions[entry["image"]] = entry["caption"]
    return captions


def iter_folder(folder: str, captions_file: str | None = None, limit: int = 0) -> Iterator[RawItem]:
    """Images under `folder` (sorted relative paths), captions from sidecar .txt or the JSONL file."""
    if not os.path.isdir(folder):
        raise ValueError(f"input {folder!r} is not a folder of images")
    captions = _read_captions_file(captions_file)
    paths = files_under(folder, IMAGE_SUFFIXES)
    if limit:
        paths = paths[:limit]
    for index, relative in enumerate(paths):
        full = os.path.join(folder, relative)
        caption, error = captions.get(relative), None
        sidecar = os.path.splitext(full)[0] + ".txt"
        if caption is None and os.path.isfile(sidecar):
            try:
                with open(sidecar, encoding="utf-8-sig") as handle:
                    caption = handle.read()
            except (OSError, UnicodeDecodeError) as e:  # not decoded with replacement characters: that garbles it
                error = f"caption file {os.path.splitext(relative)[0]}.txt cannot be read ({e}); save it as UTF-8 text"
        key = f"{index:08d}_{sanitize_key(os.path.splitext(relative)[0])}"
        yield RawItem(index=index, key=key, origin=relative, read=_read_file(full),
                      caption=caption.strip() if caption and caption.strip() else None, caption_error=error)


def _record_caption(record: dict) -> tuple[str | None, str | None]:
    """(caption or None, why a given caption could not be read or None)."""
    if "txt" in record:
        try:
            return bytes(record["txt"]).decode("utf-8-sig").strip() or None, None
        except UnicodeDecodeError as e:
            return None, f"its .txt caption is not UTF-8 text ({e})"
    if "json" in record:
        try:
            meta = json.loads(record["json"])
        except ValueError:  # JSONDecodeError, UnicodeDecodeError: img2dataset metadata, not needed without a caption
            return None, None
        if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            return meta["caption"].strip() or None, None
    return None, None


def iter_tar_images(spec: str, limit: int = 0) -> Iterator[RawItem]:
    """Image records of img2dataset-style shards (first image field found per record)."""
    for index, record in enumerate(iter_records(spec)):
        if limit and index >= limit:
            return
        if "json" in record and not any(ext in record for ext in ("jpg", "jpeg", "png", "webp")):
            raise ValueError(f"{spec} holds kosmosg-data shards (written by python -m train.data), not image-text "
                             "pairs: use them as training --data directly, or combine them with python -m train.data mix.")
        field_name = next((ext for ext in ("jpg", "jpeg", "png", "webp") if ext in record), None)
        data = bytes(record[field_name]) if field_name else b""
        key = f"{index:08d}_{sanitize_key(record['__key__'])}"
        origin = f"{os.path.basename(record.get('__url__', ''))}:{record['__key__']}"
        caption, error = _record_caption(record)
        yield RawItem(index=index, key=key, origin=origin, read=(lambda d=data: d), caption=caption, caption_error=error)


def iter_raw_items(input_spec: str | None, source: str = "auto", captions_file: str | None = None,
                   limit: int = 0) -> Iterator[RawItem]:
    if source not in ("auto", "folder", "shards"):
        raise ValueError(f"--source {source!r} is unknown: use auto, folder, shards, "
                         f"{', '.join(LABEL_SOURCES)} or package.module:factory")
    if not input_spec:
        raise ValueError("input is not set: pass --input FOLDER (images + optional .txt captions) or shards")
    if source == "auto":
        if os.path.isdir(input_spec):  # a folder: of images, or of shards (a folder name may hold "[" or ",")
            looks_like_shards = not files_under(input_spec, IMAGE_SUFFIXES)
            if looks_like_shards and not files_under(input_spec, (".tar",)):  # said "no .tar files found" before
                raise ValueError(f"--input {input_spec}: holds neither images ({', '.join(IMAGE_SUFFIXES)}) nor "
                                 ".tar shards; give the folder of images (with .txt captions) or of shards.")
        else:
            looks_like_shards = input_spec.lower().endswith(".tar") or any(c in input_spec for c in "*?[,")
        source = "shards" if looks_like_shards else "folder"
    if source == "folder":
        return iter_folder(input_spec, captions_file, limit)
    if source == "shards":
        return iter_tar_images(input_spec, limit)
    raise ValueError(f"source {source!r} is not a raw image source (folder | shards)")


# ---- label sources ---------------------------------------------------------------------------

def _nano_world(seed: int = 0, count: int = 0, **options: Any) -> LabelSource:
    from train.nano import world

    from .nano_labels import NanoWorldLabelSource

    return NanoWorldLabelSource(world, seed=seed, count=count, **options)


LABEL_SOURCES: dict[str, Callable[..., LabelSource]] = {"nano-world": _nano_world}


def is_label_source(name: str) -> bool:
    return name in LABEL_SOURCES or ":" in name


def load_label_source(name: str, seed: int, count: int, options: dict | None = None) -> LabelSource:
    """`nano-world`, or `package.module:factory` where factory(seed=, count=, **options) returns a
    `LabelSource` (len + scene(index))."""
    options = dict(options or {})
    if name in LABEL_SOURCES:
        factory = LABEL_SOURCES[name]
    elif ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"--source {name!r}: cannot import {attribute} from {module_name} ({error})") from error
    else:
        raise ValueError(f"--source {name!r}: use folder, shards, nano-world or package.module:factory")
    try:
        source = factory(seed=seed, count=count, **options)
    except TypeError as error:  # an option the factory does not take
        raise ValueError(f"--source {name!r}: source_options {sorted(options)} do not fit it ({error}); see the "
                         "source's documented options (docs/data-format.md).") from error
    if not isinstance(source, LabelSource):
        raise ValueError(f"--source {name!r} returned {type(source).__name__}, which lacks __len__ / scene(index)")
    return source


def iter_label_items(source: LabelSource, limit: int = 0) -> Iterator[LabelItem]:
    total = len(source) if not limit else min(limit, len(source))
    for index in range(total):
        yield LabelItem(index=index, key=f"{index:08d}", source=source)
