"""Flag parsing shared by the sub-commands: train.common.config.parse_config plus readable --help."""

from __future__ import annotations

import argparse
import os
from dataclasses import field

from train.common.config import build_parser, parse_config


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the module docstring's layout (dataset trees, examples) in --help."""


def parse_eval_config(config_class, argv, name: str, description: str):
    """defaults < --config FILE < flags -> `config_class` (train.common.config.parse_config).

    A first pass with the same parser but this program name and formatter answers --help and
    rejects bad flags with `python -m train.eval NAME` in the message."""
    from kosmosg_core.files import check_output_file

    parser = build_parser(config_class, description)
    parser.prog, parser.formatter_class = f"python -m train.eval {name}", _HelpFormatter
    parser.parse_args(argv)
    cfg = parse_config(config_class, argv, description=description)
    written = {}  # resolved path -> flag
    # every other path given (the checkpoint, the SD model, statistics read...): a result written there would
    # destroy it (a review replaced a model with --json naming it)
    inputs = [value for name, value in vars(cfg).items()
              if name not in OUTPUT_FILE_FIELDS and isinstance(value, str) and value and os.path.isfile(value)]
    for field_name in OUTPUT_FILE_FIELDS:  # checked before minutes of evaluation, not when the result is written
        if getattr(cfg, field_name, ""):
            flag = "--" + field_name.replace("_", "-")
            path = check_output_file(getattr(cfg, field_name), flag, inputs=inputs).resolve()
            if path in written:
                raise ValueError(f"{written[path]} and {flag} name the same file {path}; the second would overwrite "
                                 "the first. Give each its own file.")
            written[path] = flag
    return cfg


def image_side_field(side: str):
    """--height / --width of a sub-command that generates: by default (None) the SD model's own size, as in `python -m
    kosmosg_core generate`: 512 px for SD1.5 (the paper's benchmarks), 64 for the pack's nano model, which gives
    no usable picture at 512."""
    return field(default=None, metadata={"min": 1, "help": f"image {side} in pixels (default: the SD model's own size: "
                                                           "512 for SD1.5, 64 for the nano model)"})


OUTPUT_FILE_FIELDS = ("json", "output_json", "grid", "save_real_stats")  # the sub-commands' result files
