"""Configs of the data commands: dataclasses, loaded from YAML/JSON and overridden from the CLI.

Precedence: dataclass defaults < `--config FILE` < `--set key=value` < explicit flags.
A config file is a mapping; if it has a section named like the command (`build:`, `mix:`, ...)
only that section is used, so one file can configure every command.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from train.common import config as common_config

from .entities import DEFAULT_ENTITY_PROMPT

# Official stage-3 data weights: LAION : InstructPix2Pix : OpenImages (runtrain.sh).
OFFICIAL_MIX_RATIO = (1.0, 2.0, 2.0)
KINDS = ("laion", "instructpix2pix", "openimage")  # also the official `source_lang` names


@dataclass
class ModelsConfig:
    """The three labelling models (paths to save_pretrained folders) and their generation settings."""

    captioner: str | None = None  # Blip2ForConditionalGeneration folder
    captioner_processor: str | None = None  # Blip2Processor folder; default = captioner
    caption_max_new_tokens: int = 30
    caption_prompt: str | None = None  # optional BLIP-2 text prompt ("a photo of")
    recaption: bool = False  # caption even images that come with a caption
    entity_model: str | None = None  # causal LM folder (official: MPT-7B-Instruct)
    entity_prompt: str = DEFAULT_ENTITY_PROMPT  # must contain {caption}
    entity_max_new_tokens: int = 10  # official
    entity_do_sample: bool = True  # official: sampling, temperature 1.0, top-k 50, top-p 0.95
    entity_temperature: float = 1.0
    entity_top_k: int = 50
    entity_top_p: float = 0.95
    entity_max_words: int = 4  # longer "tags" are sentences, dropped
    max_entities: int = 0  # 0 = no limit (official)
    segmenter: str | None = None  # CLIPSegForImageSegmentation folder
    device: str = "auto"  # auto = LOCAL_RANK's GPU if any, else cpu
    dtype: str = "float32"  # official: float16 on GPU


@dataclass
class CropConfig:
    """Official post-processing of the CLIPSeg masks and image sizes."""

    mask_threshold: float = 0.3
    dilation_divisor: int = field(default=100, metadata={"min": 1})  # dilation window = image side // this
    entity_size: int = field(default=512, metadata={"min": 1})
    target_size: int = field(default=512, metadata={"min": 1})
    square_crop: bool = True  # centre-crop inputs to a square first (official OpenImages)


@dataclass
class BuildConfig:
    """`build`: images (+ optional captions) or a label source -> interleaved `openimage` samples."""

    input: str | None = None  # folder, .tar shard(s) / glob / dir of shards; unused by generated sources
    output: str | None = None
    source: str = "auto"  # auto | folder | shards | nano-world | package.module:factory
    source_options: dict = field(default_factory=dict)  # keyword arguments for the source factory
    captions_file: str | None = None  # optional JSONL {"image": relative path, "caption": ...}
    seed: int = 0
    count: int = field(default=0, metadata={"min": 0})  # 0 = all inputs; generated sources: number of scenes
    samples_per_shard: int = field(default=1000, metadata={"min": 1})  # input items per shard (official: 1000 lines per TSV)
    shard_prefix: str = "shard"
    models: ModelsConfig = field(default_factory=ModelsConfig)
    crop: CropConfig = field(default_factory=CropConfig)


@dataclass
class IngestConfig:
    """`ingest-ip2p` / `ingest-pairs`: already labelled data -> samples."""

    input: str | None = None
    output: str | None = None
    seed: int = 0
    count: int = field(default=0, metadata={"min": 0})  # 0 = all
    samples_per_shard: int = field(default=1000, metadata={"min": 1})
    shard_prefix: str = "shard"
    image_size: int = 512  # shorter side (official InstructPix2Pix repacking); 0 keeps the size
    min_side: int = 0  # drop images with a side below this (official LAION stage-3 filter: 384)
    max_variants: int = 0  # InstructPix2Pix seeds kept per prompt; 0 = all


@dataclass
class MixConfig:
    """`mix`: LAION-style, InstructPix2Pix and OpenImages-style shard sets -> one mixed set."""

    laion: str | None = None
    instructpix2pix: str | None = None
    openimage: str | None = None
    ratio: list = field(default_factory=lambda: list(OFFICIAL_MIX_RATIO))  # laion : ip2p : openimage
    output: str | None = None
    seed: int = 0
    count: int = field(default=0, metadata={"min": 0})  # 0 = until the first source runs out
    # true: a source that runs out starts again from its first sample, as the official loader cycles every source
    # (with real sizes the smallest set, InstructPix2Pix, runs out long before the others); needs a count
    repeat_sources: bool = False
    samples_per_shard: int = field(default=1000, metadata={"min": 1})
    shard_prefix: str = "mix"


@dataclass
class OfficialConfig:
    """`to-official` / `from-official`: WebDataset shards <-> json/train.json + data/*.tsv."""

    input: str | None = None
    output: str | None = None
    samples_per_shard: int = field(default=1000, metadata={"min": 1})  # samples per TSV (to-official) or per tar (from-official)
    shard_prefix: str = "shard"


def _coerce(value: Any, target: Any, name: str) -> Any:
    """Give a value from a file or the command line the type of the field's current value."""
    if isinstance(target, bool):
        if isinstance(value, str):
            word = common_config.bool_word(value)
            if word is None:
                raise ValueError(f"{name}={value!r}: expected true or false")
            return word
        return bool(value)
    if isinstance(target, int) and not isinstance(value, bool):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}={value!r}: expected an integer") from None
    if isinstance(target, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}={value!r}: expected a number") from None
    if isinstance(target, list) and isinstance(value, str):
        return [float(v) if _is_number(v) else v for v in value.replace(":", ",").split(",") if v]
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def set_path(config: Any, dotted: str, value: Any) -> None:
    """Set `a.b.c` on nested dataclasses, converting `value` to the field's type."""
    *parents, last = dotted.replace("-", "_").split(".")
    target = config
    for depth, part in enumerate(parents):
        if isinstance(target, dict):  # a free-form mapping (source_options): the rest of the key is one of its keys
            target[".".join([*parents[depth:], last])] = value
            return
        if not dataclasses.is_dataclass(target) or not hasattr(target, part):
            raise ValueError(f"unknown config key {dotted!r} ({type(config).__name__} has no {part!r})")
        target = getattr(target, part)
    if isinstance(target, dict):  # e.g. source_options.crops=mask
        target[last] = value
        return
    if not dataclasses.is_dataclass(target) or last not in {f.name for f in dataclasses.fields(target)}:
        names = ", ".join(f.name for f in dataclasses.fields(target)) if dataclasses.is_dataclass(target) else ""
        raise ValueError(f"unknown config key {dotted!r}; known keys here: {names}")
    current = getattr(target, last)
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise ValueError(f"{dotted} is a section: give a mapping, e.g. {dotted}.<key>=<value>")
        apply_mapping(config, value, prefix=f"{dotted}.")
        return
    if current is None:
        # optional fields are paths / names: keep YAML from turning "0001" or "123" into numbers
        declared = next(f.type for f in dataclasses.fields(target) if f.name == last)
        if "str" in str(declared) and value is not None and not isinstance(value, str):
            value = str(value)
        setattr(target, last, value)
        return
    setattr(target, last, _coerce(value, current, dotted))


def apply_mapping(config: Any, mapping: dict, prefix: str = "") -> None:
    for key, value in mapping.items():
        set_path(config, f"{prefix}{key}", value)


def read_config_file(path: str, section: str) -> dict:
    """YAML or JSON mapping (`train.common.config.read_config_file`); a `section:` entry narrows it to one command."""
    data = common_config.read_config_file(path)
    if section in data and isinstance(data[section], dict):
        return data[section]
    return data


def parse_set(items: list[str]) -> list[tuple[str, Any]]:
    """`--set key=value` -> (key, value parsed as YAML scalar/list/mapping). A setting reached twice is refused: one
    key given twice, or a section's mapping and a key inside it that both set the same entry
    (`crop={entity_size: 128}` and `crop.entity_size=256`; a mapping is merged key by key, so `crop={square_crop:
    false}` beside `crop.entity_size=256` is fine): the last would win without a word."""
    parsed, leaves = [], {}  # every setting an item reaches, as set_path reads it -> the key as given
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. --set crop.entity_size=256")
        key, raw = item.split("=", 1)
        key = key.strip()
        value = yaml.safe_load(raw) if raw.strip() else ""
        reached = _settings_reached(key.replace("-", "_"), value)  # as set_path reads it
        for leaf in reached:
            for other, given in leaves.items():
                if leaf == other or leaf.startswith(other + ".") or other.startswith(leaf + "."):
                    if given == key:
                        raise ValueError(f"--set {key} is given twice on the command line; give it once.")
                    raise ValueError(f"--set {given} and --set {key} both set {min(leaf, other, key=len)}: the last "
                                     "would win without a word; set it once.")
        leaves.update({leaf: key for leaf in reached})
        parsed.append((key, value))
    return parsed


def _settings_reached(key: str, value) -> list[str]:
    """The dotted settings `--set key=value` writes: a non-empty mapping is merged entry by entry."""
    if isinstance(value, dict) and value:
        return [leaf for name, item in value.items() for leaf in _settings_reached(f"{key}.{name}".replace("-", "_"), item)]
    return [key]


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
