"""Flag parsing shared by the sub-commands: train.common.config.parse_config plus readable --help."""

from __future__ import annotations

import argparse

from train.common.config import build_parser, parse_config


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the module docstring's layout (dataset trees, examples) in --help."""


def parse_eval_config(config_class, argv, name: str, description: str):
    """defaults < --config FILE < flags -> `config_class` (train.common.config.parse_config).

    A first pass with the same parser but this program name and formatter answers --help and
    rejects bad flags with `python -m train.eval NAME` in the message."""
    parser = build_parser(config_class, description)
    parser.prog, parser.formatter_class = f"python -m train.eval {name}", _HelpFormatter
    parser.parse_args(argv)
    return parse_config(config_class, argv, description=description)
