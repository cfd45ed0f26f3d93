"""`python -m train.data <command>`: argument parsing and dispatch.

Every command takes `--config FILE` (YAML/JSON), `--set key=value` (repeatable, dotted keys for
nested sections: `--set models.dtype=float16`) and a few explicit flags, applied in that order.
Run directly or under `accelerate launch -m train.data ...` / `torchrun -m`: shards are split
across processes by RANK / WORLD_SIZE.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

from kosmosg_core.cli import OneValuePerFlagParser
from train.common.config import INPUT_ERRORS, input_error_message

from . import config as cfg

# command -> (config class, help, explicit flags as (flag, dotted key, type, help))
_COMMON = [("--input", "input", str, "input (see the command's description)"),
           ("--output", "output", str, "output folder for the shards"),
           ("--samples-per-shard", "samples_per_shard", int, "input items per output shard")]

COMMANDS: dict[str, tuple[type, str, str, list]] = {
    "build": (cfg.BuildConfig, "images (+captions) -> captions, entities, masks -> interleaved samples",
              "Input: a folder of images with optional <stem>.txt captions, or img2dataset-style .tar shards. "
              "Captions come from the files or the BLIP-2 captioner; entities from the instruction LLM; masks "
              "from CLIPSeg (official post-processing). --source nano-world (or package.module:factory) uses a "
              "label source instead of the three models.",
              _COMMON + [("--source", "source", str, "auto | folder | shards | nano-world | package.module:factory"),
                         ("--labels-from", "source", str, "alias of --source for label sources"),
                         ("--captions-file", "captions_file", str, "JSONL {image, caption} captions"),
                         ("--seed", "seed", int, "run seed (per-item seeds derive from it)"),
                         ("--count", "count", int, "at most this many items / scenes (0 = all)"),
                         ("--captioner", "models.captioner", str, "Blip2ForConditionalGeneration folder"),
                         ("--captioner-processor", "models.captioner_processor", str, "Blip2Processor folder"),
                         ("--entity-model", "models.entity_model", str, "instruction causal LM folder"),
                         ("--segmenter", "models.segmenter", str, "CLIPSegForImageSegmentation folder"),
                         ("--device", "models.device", str, "auto | cpu | cuda | cuda:N"),
                         ("--dtype", "models.dtype", str, "float32 | float16 | bfloat16"),
                         ("--entity-size", "crop.entity_size", int, "entity crop side (official 512)"),
                         ("--target-size", "crop.target_size", int, "target image side (official 512)")]),
    "ingest-ip2p": (cfg.IngestConfig, "InstructPix2Pix triplets -> samples",
                    "Input: the released dataset folder (seeds.json, <name>/prompt.json, <seed>_0.jpg, <seed>_1.jpg) "
                    "or a JSONL of {input_caption, edit, source, edited} / {..., pairs}.",
                    _COMMON + [("--count", "count", int, "at most this many triplets"),
                               ("--image-size", "image_size", int, "shorter side (0 keeps)")]),
    "ingest-pairs": (cfg.IngestConfig, "image-caption pairs -> text-to-image samples",
                     "Input: a folder of images + <stem>.txt captions, img2dataset .tar shards, or a JSONL of "
                     "{image, caption}.",
                     _COMMON + [("--count", "count", int, "at most this many pairs"),
                                ("--image-size", "image_size", int, "shorter side (0 keeps)"),
                                ("--min-side", "min_side", int, "drop smaller images (official LAION: 384)")]),
    "mix": (cfg.MixConfig, "mix LAION : InstructPix2Pix : OpenImages shard sets (default 1:2:2)",
            "Each output sample draws its source with the given weights from a seeded RNG.",
            [("--laion", "laion", str, "text-to-image shards"),
             ("--instructpix2pix", "instructpix2pix", str, "editing shards"),
             ("--openimage", "openimage", str, "interleaved subject shards"),
             ("--ratio", "ratio", str, "weights laion,instructpix2pix,openimage (default 1,2,2)"),
             ("--output", "output", str, "output folder"),
             ("--seed", "seed", int, "mixing seed"),
             ("--count", "count", int, "total samples (0 = until a source runs out)"),
             ("--repeat-sources", "repeat_sources", str, "true: a source that runs out starts again (as the official "
                                                         "loader); needs --count"),
             ("--samples-per-shard", "samples_per_shard", int, "samples per output shard")]),
    "to-official": (cfg.OfficialConfig, "shards -> official json/train.json + data/*.tsv layout",
                    "Writes OUTPUT/<kind>/json/train.json and OUTPUT/<kind>/data/*.tsv (base64 PNG images).",
                    [("--input", "input", str, "shards (folder, glob or files)"),
                     ("--output", "output", str, "output root"),
                     ("--samples-per-shard", "samples_per_shard", int, "lines per TSV (official 1000)")]),
    "from-official": (cfg.OfficialConfig, "official json + TSV layout -> shards",
                      "Input: a folder with json/train.json (+ data/*.tsv), or a folder of such folders.",
                      _COMMON),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneValuePerFlagParser(prog="python -m train.data",
                                   description="Kosmos-G training data: construction, ingestion, mixing, "
                                               "official-layout conversion (WebDataset shards).")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name, (_, summary, description, flags) in COMMANDS.items():
        # allow_abbrev=False: a mistyped flag must not be taken for a longer one it begins (`--out` for `--output`)
        sub = subparsers.add_parser(name, help=summary, description=f"{summary}. {description}", allow_abbrev=False)
        sub.add_argument("--config", default=argparse.SUPPRESS,
                         help="YAML or JSON config file (a `%s:` section is used if present)" % name)
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config key, dotted for sections (repeatable)")
        sub.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        sub.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
        for flag, key, kind, text in flags:
            sub.add_argument(flag, dest=f"opt:{key}:{flag}", type=kind, default=argparse.SUPPRESS,
                             help=text, metavar=flag.lstrip("-").replace("-", "_").upper())
    return parser


def resolve_config(args: argparse.Namespace) -> Any:
    config_class = COMMANDS[args.command][0]
    config = config_class()
    if getattr(args, "config", None):
        cfg.apply_mapping(config, cfg.read_config_file(args.config, args.command))
    for key, value in cfg.parse_set(args.set):
        cfg.set_path(config, key, value)
    flag_of = {}  # config key -> the explicit flag that set it (two flags may name one key: --source, --labels-from)
    for dest, value in vars(args).items():  # only the flags given: their default is SUPPRESS
        if dest.startswith("opt:"):
            _, key, flag = dest.split(":")
            if key in flag_of:
                raise ValueError(f"{flag_of[key]} and {flag} both set {key}; give one of them.")
            flag_of[key] = flag
            cfg.set_path(config, key, value)
    _check_ranges(config)
    return config


def _check_ranges(config, prefix: str = "") -> None:
    """Each setting against its declared range (`metadata["min"]`: a negative --count dropped items by slicing, a
    0 --samples-per-shard wrote one file per sample), nested settings (crop.*, models.*) named by their key."""
    import dataclasses

    from train.common.config import check_minimums, flag_name

    check_minimums(config, label=lambda name: f"{prefix}{name}" if prefix else flag_name(name))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            _check_ranges(value, f"{prefix}{field.name}.")


def _runner(command: str) -> Callable[[Any], dict]:
    # imported here so --help never loads torch / transformers
    if command == "build":
        from .build import run_build
        return run_build
    if command == "ingest-ip2p":
        from .ingest import run_ingest_ip2p
        return run_ingest_ip2p
    if command == "ingest-pairs":
        from .ingest import run_ingest_pairs
        return run_ingest_pairs
    if command == "mix":
        from .mix import run_mix
        return run_mix
    if command == "to-official":
        from .official_tsv import run_to_official
        return run_to_official
    from .official_tsv import run_from_official
    return run_from_official


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = resolve_config(args)
        if args.print_config:
            print(json.dumps(cfg.to_dict(config), indent=2))
            return 0
        summary = _runner(args.command)(config)
    except INPUT_ERRORS as error:
        print(f"error: {input_error_message(error)}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "this_run"}, sort_keys=True))
    return 0
