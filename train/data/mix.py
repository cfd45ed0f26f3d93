"""`mix`: interleave the three sources into one shard set with a configurable ratio.

Official stage-3 weights are LAION : InstructPix2Pix : OpenImages = 1 : 2 : 2. Each output slot
draws its source from a seeded RNG with those weights (what WebDataset's RandomMix and the
official multi-source loader do), streaming every source in its own order; the mix stops at
`count` samples or when a drawn source runs out, so the ratio holds over the whole output (the rest of the other
sources is left out: logged). With `repeat_sources` a source that runs out starts again from its first sample, as
the official loader cycles every source, until `count`.
Samples are renamed `000000000`, `000000001`, ... and their meta gains
`mixed_from = {"source": kind, "key": original key}`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Iterator

from train.common.folder_settings import SETTINGS_NAME

from .config import KINDS, MixConfig
from .shards import ProcessResult, Sample, encode_meta, iter_records, run_sharded

logger = logging.getLogger(__name__)


@dataclass
class MixItem:
    index: int
    source: str
    record: dict

    @property
    def key(self) -> str:
        return f"{self.index:09d}"


def mix_plan(config: MixConfig) -> tuple[list[str], list[float], dict[str, str]]:
    try:
        ratio = [float(r) for r in config.ratio]
    except (TypeError, ValueError):
        ratio = []  # not numbers: the message below names the flag
    if len(ratio) != len(KINDS) or any(not math.isfinite(r) or r < 0 for r in ratio) or sum(ratio) <= 0:
        raise ValueError(f"ratio {config.ratio!r}: give three non-negative weights laion,instructpix2pix,openimage "
                         "(official 1,2,2), e.g. --ratio 1,2,2")
    inputs = {kind: getattr(config, kind) for kind in KINDS}
    names, weights = [], []
    for kind, weight in zip(KINDS, ratio):
        if weight > 0 and inputs[kind]:
            names.append(kind)
            weights.append(weight)
        elif weight > 0:
            raise ValueError(f"ratio gives {kind} weight {weight:g} but --{kind} is not set: "
                             f"pass its shards or set its weight to 0")
    return names, weights, {k: inputs[k] for k in names}


def _checked_stream(kind: str, spec: str) -> Iterator[dict]:
    """The records of --KIND's shards; the first one must be a `kind` sample (a swapped flag is named)."""
    records = iter_records(spec)
    first = next(records, None)
    if first is None:
        return
    found = Sample.from_wds(first).meta.get("kind")
    if found != kind:
        raise ValueError(f"--{kind} {spec} holds {found!r} samples (first: {first['__key__']}), not {kind!r} ones; "
                         "give each of --laion / --instructpix2pix / --openimage the shards of its own kind.")
    yield first
    yield from records


def iter_mixed(config: MixConfig) -> Iterator[MixItem]:
    names, weights, inputs = mix_plan(config)
    if config.repeat_sources and not config.count:
        raise ValueError("--repeat-sources true needs --count N: repeated sources never run out, so the mix needs "
                         "its length.")
    streams = {kind: _checked_stream(kind, inputs[kind]) for kind in names}
    drawn = dict.fromkeys(names, 0)
    rng = random.Random(config.seed)
    index = 0
    while not config.count or index < config.count:
        kind = rng.choices(names, weights)[0]
        record = next(streams[kind], None)
        if record is None and config.repeat_sources and drawn[kind]:
            streams[kind] = _checked_stream(kind, inputs[kind])  # from its first sample again
            record = next(streams[kind], None)
        if record is None:
            logger.info("mix: --%s ran out after %d samples; the mix ends at %d (%s); --repeat-sources true with "
                        "--count N starts a source again instead", kind, drawn[kind], index,
                        ", ".join(f"{name} {count}" for name, count in drawn.items()))
            return
        drawn[kind] += 1
        yield MixItem(index, kind, record)
        index += 1


def _process(item: MixItem) -> ProcessResult:
    sample = Sample.from_wds(item.record)
    if sample.meta.get("kind") != item.source:  # one stray sample in a source's shards: left out, counted
        return None, "skipped_wrong_kind"
    meta = dict(sample.meta)
    meta["mixed_from"] = {"source": item.source, "key": sample.key}
    json.loads(encode_meta(meta))  # fail here, not in the writer, if meta is not JSON-clean
    return Sample(item.key, meta, sample.images), "written"


def _recorded(folder: str, key: str) -> bool:
    """Whether the settings.json of `folder` (if any, and readable) records `key`."""
    try:
        with open(os.path.join(folder, SETTINGS_NAME), encoding="utf-8") as handle:
            return key in json.load(handle)
    except (OSError, ValueError, TypeError):
        return False


def run_mix(config: MixConfig) -> dict:
    if not config.output:
        raise ValueError("output is not set: pass --output DIR for the mixed shards")
    settings = dataclasses.asdict(config)
    if not config.repeat_sources and not _recorded(config.output, "repeat_sources"):
        del settings["repeat_sources"]  # recorded only when set: a folder an earlier version mixed reruns as before
    return run_sharded(iter_mixed(config), _process, config.output, config.samples_per_shard,
                       config.shard_prefix, what="mix", settings=settings)
