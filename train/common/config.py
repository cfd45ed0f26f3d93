"""Training configs: a dataclass per entry point, filled from defaults < `--config FILE` < command-line flags.

Every dataclass field becomes a flag (`--learning-rate 3e-4`), its help text taken from the field's
`metadata={"help": ...}`; `--config` reads YAML or JSON with the same field names.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _flag_type(field_type):
    origin = typing.get_origin(field_type)
    if origin is typing.Union or str(origin) == "types.UnionType":  # Optional[X] / X | None
        args = [a for a in typing.get_args(field_type) if a is not type(None)]
        return _flag_type(args[0])
    if field_type is bool:
        return _parse_bool
    if field_type in (int, float, str):
        return field_type
    if origin in (list, tuple):
        inner = typing.get_args(field_type)[0] if typing.get_args(field_type) else str
        return lambda text: [_flag_type(inner)(x) for x in text.split(",") if x != ""]
    return str


def read_config_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Config file not found: {path}. Pass an existing YAML or JSON file to --config.")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"Config file {path} must hold a mapping of field names to values.")
    return data


def build_parser(config_class, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML or JSON file with any of the fields below")
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=_flag_type(hints[field.name]),
                            default=argparse.SUPPRESS, help=f"{field.metadata.get('help', '')} (default: {default})")
    return parser


def parse_config(config_class, argv=None, description: str = ""):
    """defaults < --config file < explicit flags -> an instance of `config_class`."""
    parser = build_parser(config_class, description)
    args = vars(parser.parse_args(argv))
    values = {}
    if args.get("config"):
        values.update(read_config_file(args.pop("config")))
    args.pop("config", None)
    values.update(args)
    names = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - names)
    if unknown:
        parser.error(f"unknown config fields {unknown}; valid fields: {sorted(names)}")
    hints = typing.get_type_hints(config_class)
    for key, value in list(values.items()):  # values from files arrive untyped
        if isinstance(value, str) and hints[key] is not str:
            values[key] = _flag_type(hints[key])(value)
    return config_class(**values)


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def run_entry_point(config_class, train, argv=None, description: str = "", as_script: bool = False):
    """Parse the config and call `train(cfg)`. Run as a script (`python -m ...`), a ValueError
    (bad input, refused checkpoint) ends the process with its one-line message instead of a traceback;
    called from Python (tests), it propagates."""
    import logging
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_config(config_class, argv, description=description)
    try:
        return train(cfg)
    except ValueError as e:
        if as_script:
            sys.exit(f"error: {e}")
        raise
