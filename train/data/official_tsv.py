"""The official data layout <-> WebDataset shards (`to-official` / `from-official`).

Official layout (spec section 8), one folder per source:
  <source>/json/train.json  [{"source": ["x.tsv", ...], "source_lang": <kind>, "weight": 1.0, "name": <kind>}]
  <source>/data/x.tsv       one example per line, tab-separated, images base64 PNG/JPEG (train.json lists
                            "x.tsv": the OpenImages / InstructPix2Pix loaders open data/x.tsv; the LAION loader opens
                            the listed path under <source>, so its list says "data/x.tsv"):
    laion:           key \t caption \t image \t width \t height   (the loader reads fields 1-4)
    instructpix2pix: input_caption \t edit \t (source \t edited) x seeds
    openimage:       caption \t tag1,tag2,... \t full_image \t (crop_k \t masked_crop_k) x tags
`to-official` writes OUTPUT/<kind>/{json,data}; `from-official` reads one such folder or a folder
holding several, applying the official loader's tag filter and ordering to openimage lines.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass

from PIL import Image

from kosmosg_core.files import write_json, write_text_atomic
from train.common.config import read_json

from .config import KINDS, OfficialConfig
from .crops import CorruptImageError, decode_image, png_bytes
from .entities import clean_text, layout_interleaved
from .samples import ip2p_sample, laion_sample, openimage_sample
from .shards import ProcessResult, Sample, distributed_rank, read_samples, run_sharded, sanitize_key

logger = logging.getLogger(__name__)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _tsv_field(text: str | None) -> str:
    return clean_text(text or "")  # tabs / newlines would break the line format


def sample_to_row(sample: Sample) -> tuple[str, list[str]]:
    """(kind, TSV fields) for one sample."""
    meta, images = sample.meta, sample.images
    kind = meta.get("kind")
    if kind == "laion":
        with Image.open(io.BytesIO(images["target.png"])) as image:
            width, height = image.size
        return kind, [sample.key, _tsv_field(meta["caption"]), _b64(images["target.png"]), str(width), str(height)]
    if kind == "instructpix2pix":
        fields = [_tsv_field(meta["caption"]), _tsv_field(meta["instruction"]),
                  _b64(images["entity_0.png"]), _b64(images["target.png"])]
        for variant in range(1, int(meta.get("variants", 0)) + 1):
            fields += [_b64(images[f"variant_{variant}_entity_0.png"]), _b64(images[f"variant_{variant}_target.png"])]
        return kind, fields
    if kind == "openimage":
        entities = meta["entities"]
        fields = [_tsv_field(meta["caption"]), ",".join(e["name"] for e in entities), _b64(images["target.png"])]
        for entity in entities:
            fields += [_b64(images[entity["image"]]), _b64(images[entity["masked"] or entity["image"]])]
        return kind, fields
    raise ValueError(f"sample {sample.key!r}: unknown kind {kind!r} (expected one of {', '.join(KINDS)})")


def run_to_official(config: OfficialConfig) -> dict:
    """Shards -> OUTPUT/<kind>/json/train.json + data/<prefix>-NNNNNN.tsv (atomic per TSV)."""
    if not config.input or not config.output:
        raise ValueError("to-official needs --input SHARDS and --output DIR")
    rank, world = distributed_rank()
    if rank != 0:  # one pass over the shards, no model: process 0 writes the whole layout
        logger.info("to-official runs in one process: process %d of %d has nothing to do", rank, world)
        return {}
    if os.path.isdir(config.output) and os.listdir(config.output):
        # it writes a whole layout: an earlier run's kinds left beside this run's would be read back as part of it
        raise ValueError(f"--output {config.output} is not empty (an earlier to-official run's layout?); to-official "
                         "writes a whole official layout: give a new or empty folder, or remove this one to rewrite it.")
    counts: Counter = Counter()
    buffers: dict[str, list[str]] = defaultdict(list)
    written: dict[str, list[str]] = defaultdict(list)

    def flush(kind: str) -> None:
        data_dir = os.path.join(config.output, kind, "data")
        os.makedirs(data_dir, exist_ok=True)
        name = f"{config.shard_prefix}-{len(written[kind]):06d}.tsv"
        write_text_atomic(os.path.join(data_dir, name), "".join(line + "\n" for line in buffers[kind]))
        written[kind].append(name)
        buffers[kind] = []

    for sample in read_samples(config.input):
        counts["processed"] += 1
        try:
            kind, fields = sample_to_row(sample)
        except (KeyError, ValueError, OSError) as error:
            logger.warning("%s: cannot convert (%s); skipped", sample.key, error)
            counts["failed_convert"] += 1
            continue
        names = [entity["name"] for entity in sample.meta.get("entities", [])] if kind == "openimage" else []
        if len(set(names)) < len(names):  # two entities of one name, from a label source
            logger.warning("%s: the official format names entities by their word, so the official loader (and "
                           "from-official) reads the %s repeated in %s as one ambiguous tag and leaves those entities "
                           "out; the line is written with them", sample.key,
                           "/".join(sorted({n for n in names if names.count(n) > 1})), names)
            counts["repeated_entity_names"] += 1
        buffers[kind].append("\t".join(fields))
        counts["written"] += 1
        counts[f"written_{kind}"] += 1
        if len(buffers[kind]) >= config.samples_per_shard:
            flush(kind)
    for kind in list(buffers):
        if buffers[kind]:
            flush(kind)
    for kind, names in written.items():
        os.makedirs(os.path.join(config.output, kind, "json"), exist_ok=True)
        listed = [f"data/{name}" for name in names] if kind == "laion" else names  # as each official loader opens it
        write_json(os.path.join(config.output, kind, "json", "train.json"),
                   [{"source": listed, "source_lang": kind, "weight": 1.0, "name": kind}])
    summary = dict(sorted(counts.items()))
    write_json(os.path.join(config.output, "summary.json"), summary)
    logger.info("to-official summary: %s", json.dumps(summary, sort_keys=True))
    return summary


# ---- from-official ---------------------------------------------------------------------------

@dataclass
class TsvLine:
    index: int
    kind: str
    origin: str
    fields: list[str]

    @property
    def key(self) -> str:
        return sanitize_key(self.origin.replace(":", "_"))


def _kind_of(entry: dict) -> str:
    label = f"{entry.get('source_lang', '')} {entry.get('name', '')}".lower()
    for kind, marker in (("instructpix2pix", "pix2pix"), ("openimage", "openimage"), ("laion", "laion")):
        if marker in label:
            return kind
    raise ValueError(f"train.json entry {entry.get('name')!r}: source_lang/name must name laion, "
                     "instructpix2pix or openimage")


def official_folders(root: str) -> list[str]:
    if os.path.isfile(os.path.join(root, "json", "train.json")):
        return [root]
    folders = sorted(os.path.join(root, d) for d in os.listdir(root)
                     if os.path.isfile(os.path.join(root, d, "json", "train.json"))) if os.path.isdir(root) else []
    if not folders:
        raise ValueError(f"input {root!r}: no json/train.json here or in its sub-folders (official layout)")
    return folders


def iter_official(root: str):
    index = 0
    for folder in official_folders(root):
        listing = os.path.join(folder, "json", "train.json")
        holds = 'a list of {"source": [TSV file names], ...} entries (the official layout)'
        entries = read_json(listing, list, holds, "Check the folder given to --input.")
        if not all(isinstance(entry, dict) and isinstance(entry.get("source", []), list)
                   and all(isinstance(name, str) for name in entry.get("source", [])) for entry in entries):
            # a "source" written as one name was read letter by letter (each "missing"), an entry that is no
            # mapping was a bare AttributeError
            raise ValueError(f"{listing}: an entry is not {{\"source\": [TSV file names], ...}}; it should hold "
                             f"{holds}. Check the folder given to --input.")
        for entry in entries:
            kind = _kind_of(entry)
            for name in entry.get("source", []):
                # openimage / instructpix2pix loaders read data/<name>; the LAION loader reads <name>
                path = next((p for p in (os.path.join(folder, "data", name), os.path.join(folder, name))
                             if os.path.isfile(p)), None)
                if path is None:
                    logger.warning("%s: listed in train.json but missing; skipped", name)
                    continue
                with open(path, "rb") as handle:  # decoded per line: one line that is not UTF-8 is one bad line
                    for number, raw in enumerate(handle, 1):
                        # the listed path but the data/ the LAION listing writes (subfolders keep keys apart)
                        stem = os.path.splitext(name.removeprefix("data/"))[0]
                        origin = f"{os.path.basename(folder)}/{stem}:{number:07d}"
                        try:
                            line = raw.decode("utf-8").rstrip("\r\n")
                        except UnicodeDecodeError as error:
                            logger.warning("%s: not UTF-8 text (%s); counted as malformed", origin, error)
                            line = None
                        if line is None or line.strip():
                            yield TsvLine(index, kind, origin, [] if line is None else line.split("\t"))
                            index += 1


def _png_from_b64(text: str, name: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError as error:
        raise CorruptImageError(f"{name}: not base64 ({error})") from error
    if data.startswith(PNG_MAGIC):
        decode_image(data, name)  # validate, keep the exact bytes
        return data
    return png_bytes(decode_image(data, name))


def _malformed(line: TsvLine, expected: str) -> ProcessResult:
    if line.fields:  # no fields: a line that is not UTF-8, warned about when read
        logger.warning("%s: %d tab-separated fields, expected %s (docs/data-format.md); counted as malformed",
                       line.origin, len(line.fields), expected)
    return None, "malformed"


def tsv_line_to_sample(line: TsvLine) -> ProcessResult:
    fields, key, origin = line.fields, line.key, line.origin
    try:
        if line.kind == "laion":
            if len(fields) < 3:
                return _malformed(line, "key, caption, image[, width, height]")
            return laion_sample(key, clean_text(fields[1]), _png_from_b64(fields[2], origin), origin), "written"
        if line.kind == "instructpix2pix":
            if len(fields) < 4 or len(fields) % 2:
                return _malformed(line, "input caption, edit, then (source, edited) image pairs")
            pairs = [(_png_from_b64(fields[i], origin), _png_from_b64(fields[i + 1], origin))
                     for i in range(2, len(fields), 2)]
            return ip2p_sample(key, clean_text(fields[0]), clean_text(fields[1]), pairs, origin), "written"
        if len(fields) < 3:
            return _malformed(line, "caption, tags, image, then (crop, masked crop) per tag")
        caption, tags = clean_text(fields[0]), fields[1].split(",")  # as every caption: no control chars, no <i>
        layout = layout_interleaved(caption, tags)  # official loader: filter, order, place
        crops = []
        for name in layout.entities:
            tag_id = tags.index(name)
            if len(fields) < 5 + 2 * tag_id:
                return _malformed(line, f"a (crop, masked crop) pair for tag {name!r}")
            crops.append((_png_from_b64(fields[3 + 2 * tag_id], origin), _png_from_b64(fields[4 + 2 * tag_id], origin)))
        if not layout.entities:
            return None, "no_entities"
        return openimage_sample(key, caption, layout, _png_from_b64(fields[2], origin), crops, origin), "written"
    except CorruptImageError as error:
        logger.warning("%s: %s; skipped", origin, error)
        return None, "skipped_corrupt"


def run_from_official(config: OfficialConfig) -> dict:
    if not config.input or not config.output:
        raise ValueError("from-official needs --input DIR (official layout) and --output DIR")
    return run_sharded(iter_official(config.input), tsv_line_to_sample, config.output, config.samples_per_shard,
                       config.shard_prefix, what="from-official", settings=dataclasses.asdict(config))
