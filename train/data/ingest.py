"""`ingest-ip2p` and `ingest-pairs`: already labelled data -> samples (no models involved).

InstructPix2Pix input, either layout:
- the released clip-filtered dataset: `DIR/seeds.json` = [[name, [seed, ...]], ...],
  `DIR/<name>/prompt.json` = {"input": caption, "edit": instruction, ...},
  `DIR/<name>/<seed>_0.jpg` (source) and `<seed>_1.jpg` (edited);
- a JSONL file (or `DIR/triplets.jsonl`), one triplet per line:
  {"input_caption": ..., "edit": ..., "source": "a.png", "edited": "b.png"} or, for several
  seeds, {"input_caption": ..., "edit": ..., "pairs": [["a0.png", "b0.png"], ["a1.png", "b1.png"]]};
  image paths are relative to the JSONL file's folder.

Image-caption pairs input: a folder of images with `<stem>.txt` captions, img2dataset-style shards, or a JSONL
file of {"image": path, "caption": text} (what `build` takes as --captions-file, here as --input).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass

from train.common.config import read_json, read_utf8_lines

from .config import IngestConfig
from .crops import CorruptImageError, decode_image, resize_shorter_side, resized_beyond_pixel_limit
from .entities import clean_text
from .samples import ip2p_sample, laion_sample
from .shards import ProcessResult, run_sharded, sanitize_key
from .sources import CAPTION_ENTRY_LAYOUT, RawItem, _read_file, is_caption_entry, iter_raw_items

logger = logging.getLogger(__name__)


@dataclass
class TripletItem:
    index: int
    key: str
    origin: str
    input_caption: str
    edit: str
    pairs: list[tuple[str, str]]  # (source path, edited path) per seed


def _read_jsonl(path: str) -> list[tuple[int, object]]:
    """(line number, parsed entry) per non-blank line: messages name the line a user's editor shows."""
    entries = []
    with open(path, encoding="utf-8-sig") as handle:  # -sig: a byte-order mark (Windows editors) is not JSON
        for number, line in enumerate(read_utf8_lines(handle, path), 1):
            if line.strip():
                try:
                    entries.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not a JSON line ({error})") from error
    return entries


def iter_ip2p(input_spec: str | None, limit: int = 0) -> list[TripletItem]:
    if not input_spec:
        raise ValueError("input is not set: pass --input DIR (seeds.json layout) or a triplets .jsonl file")
    jsonl = input_spec if input_spec.lower().endswith(".jsonl") else os.path.join(input_spec, "triplets.jsonl")
    items: list[TripletItem] = []
    if os.path.isfile(jsonl):
        base = os.path.dirname(os.path.abspath(jsonl))
        for index, (line, entry) in enumerate(_read_jsonl(jsonl)):
            try:
                pairs = entry.get("pairs") or [[entry["source"], entry["edited"]]]
                texts = entry["input_caption"], entry["edit"]
                if not all(isinstance(text, str) for text in texts):  # a number or a list failed mid-build
                    raise TypeError(f"input_caption and edit must be text, got {', '.join(map(repr, texts))[:120]}")
                items.append(TripletItem(index, f"{index:08d}", f"{os.path.basename(jsonl)}:{line}", *texts,
                                         [(os.path.join(base, s), os.path.join(base, e)) for s, e in pairs]))
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                raise ValueError(f"{jsonl}:{line}: expected input_caption, edit and source/edited "
                                 f"or pairs ({error})") from error
    elif os.path.isfile(os.path.join(input_spec, "seeds.json")):
        seeds_path = os.path.join(input_spec, "seeds.json")
        layout = "[[folder name, [seed, ...]], ...] (the InstructPix2Pix release's seeds.json)"
        fix = "Give the release's folder as it was downloaded, or a triplets .jsonl file."
        seeds_list = read_json(seeds_path, list, layout, fix)
        if not all(isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], list)
                   for entry in seeds_list):
            raise ValueError(f"{seeds_path}: an entry is not [folder name, [seed, ...]]; it should hold {layout}. {fix}")
        for index, (name, seeds) in enumerate(seeds_list):
            folder = os.path.join(input_spec, name)
            prompt_path = os.path.join(folder, "prompt.json")
            try:
                with open(prompt_path, encoding="utf-8-sig") as handle:
                    prompt = json.load(handle)
                caption, edit = prompt["input"], prompt["edit"]
            except (OSError, ValueError, KeyError, TypeError) as error:  # ValueError: bad JSON, not UTF-8
                logger.warning("%s: unreadable prompt (%s); its images become a skipped item", prompt_path, error)
                caption, edit = "", ""
            pairs = [(os.path.join(folder, f"{seed}_0.jpg"), os.path.join(folder, f"{seed}_1.jpg")) for seed in seeds]
            items.append(TripletItem(index, f"{index:08d}_{sanitize_key(str(name))}", str(name), caption, edit, pairs))
    else:
        raise ValueError(f"input {input_spec!r}: expected a triplets .jsonl file, DIR/triplets.jsonl or "
                         "DIR/seeds.json (InstructPix2Pix release layout)")
    return items[:limit] if limit else items


def make_ip2p_processor(config: IngestConfig):
    def process(item: TripletItem) -> ProcessResult:
        caption, edit = clean_text(item.input_caption), clean_text(item.edit)
        if not edit:
            return None, "missing_caption"
        pairs = []
        for source_path, edited_path in item.pairs[: config.max_variants or None]:
            try:
                source = decode_image(_read_file(source_path)(), source_path)
                edited = decode_image(_read_file(edited_path)(), edited_path)
            except (CorruptImageError, OSError) as error:
                logger.warning("%s: %s; pair skipped", item.key, error)
                continue
            if min(*source.size, *edited.size) < config.min_side:
                continue
            if resized_beyond_pixel_limit(source, config.image_size) or \
                    resized_beyond_pixel_limit(edited, config.image_size):
                logger.warning("%s: %s or its edit is too elongated to resize its shorter side to %d px; pair "
                               "skipped", item.key, source_path, config.image_size)
                continue
            pairs.append((resize_shorter_side(source, config.image_size),
                          resize_shorter_side(edited, config.image_size)))
        if not pairs:
            return None, "skipped_corrupt"
        return ip2p_sample(item.key, caption, edit, pairs, item.origin), "written"
    return process


def _run_ingest(config: IngestConfig, iter_items, make_processor, what: str) -> dict:
    if not config.output:
        raise ValueError("output is not set: pass --output DIR for the shards")
    for name in ("image_size", "min_side", "max_variants", "count"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name}={getattr(config, name)}: must be 0 or more (0 = {'keep' if name == 'image_size' else 'no limit'}).")
    items = iter_items(config.input, config.count)
    return run_sharded(items, make_processor(config), config.output, config.samples_per_shard, config.shard_prefix,
                       what=what, settings={"command": what, **dataclasses.asdict(config)})


def run_ingest_ip2p(config: IngestConfig) -> dict:
    return _run_ingest(config, iter_ip2p, make_ip2p_processor, "ingest-ip2p")


def iter_pairs(input_spec: str | None, limit: int = 0):
    if input_spec and input_spec.lower().endswith(".jsonl") and os.path.isfile(input_spec):
        base = os.path.dirname(os.path.abspath(input_spec))
        entries = _read_jsonl(input_spec)[: limit or None]
        for line, entry in entries:  # checked before any work: a bad line is a bad file, named at once
            if not is_caption_entry(entry):
                raise ValueError(f"{input_spec}:{line}: {entry!r:.80} is not {CAPTION_ENTRY_LAYOUT}; write one such "
                                 "object per line")
        for index, (_, entry) in enumerate(entries):
            image = entry["image"]  # text: checked above
            yield RawItem(index, f"{index:08d}", image, _read_file(os.path.join(base, image)), entry.get("caption"))
        return
    yield from iter_raw_items(input_spec, "auto", None, limit)


def make_pairs_processor(config: IngestConfig):
    def process(item: RawItem) -> ProcessResult:
        if item.caption_error:
            logger.warning("%s: %s; skipped", item.key, item.caption_error)
            return None, "unreadable_caption"
        caption = clean_text(item.caption or "")
        if not caption:
            return None, "missing_caption"
        try:
            image = decode_image(item.read(), item.origin)
        except (CorruptImageError, OSError) as error:
            logger.warning("%s: %s; skipped", item.key, error)
            return None, "skipped_corrupt"
        if min(image.size) < config.min_side:
            return None, "too_small"
        if resized_beyond_pixel_limit(image, config.image_size):
            logger.warning("%s: %dx%d is too elongated to resize its shorter side to %d px; skipped", item.origin,
                           *image.size, config.image_size)
            return None, "too_large"
        return laion_sample(item.key, caption, resize_shorter_side(image, config.image_size), item.origin), "written"
    return process


def run_ingest_pairs(config: IngestConfig) -> dict:
    return _run_ingest(config, iter_pairs, make_pairs_processor, "ingest-pairs")
