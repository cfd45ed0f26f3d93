"""Training configs: a dataclass per entry point, filled from defaults < `--config FILE` < command-line flags.

Every dataclass field becomes a flag (`--learning-rate 3e-4`), its help text taken from the field's
`metadata={"help": ...}`; `--config` reads YAML or JSON with the same field names. A count or size
declares its lowest value with `metadata={"min": N}`, a probability also its highest with `"max"` (checked by
`check_minimums`, shown in --help); a number field never takes NaN or an infinity. A setting given twice in one
place (a key of the file, a flag on the command line) is refused by name; a flag over the file's value is not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import types
import typing
from pathlib import Path

from kosmosg_core.cli import OneValuePerFlagParser
from kosmosg_core.errors import KosmosGError

logger = logging.getLogger(__name__)


BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def bool_word(text: str) -> bool | None:
    """A true/false word (BOOL_WORDS, any case) -> its bool; anything else -> None."""
    return BOOL_WORDS.get(text.strip().lower())


def _parse_bool(text: str) -> bool:
    value = bool_word(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
    return value


def _without_optional(field_type):
    """Optional[X] / X | None -> X."""
    origin = typing.get_origin(field_type)
    if origin in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(field_type) if a is not type(None)][0]
    return field_type


def _flag_type(field_type):
    field_type = _without_optional(field_type)
    origin = typing.get_origin(field_type)
    if field_type is bool:
        return _parse_bool
    if field_type in (int, float, str):
        return field_type
    if origin in (list, tuple):
        inner = typing.get_args(field_type)[0] if typing.get_args(field_type) else str
        return lambda text: [_flag_type(inner)(x) for x in text.split(",") if x != ""]
    return str


def _file_value(name: str, value, field_type, source: str):
    """A value read from a config file (YAML / JSON types) -> the field's type, or a ValueError naming both."""
    base = _without_optional(field_type)
    if value is None and base is not field_type:
        return None
    origin = typing.get_origin(base)
    try:
        if base is bool:
            return value if isinstance(value, bool) else _parse_bool(str(value))
        if base is int and not isinstance(value, bool):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return value if isinstance(value, int) else int(str(value))
        if base is float and not isinstance(value, bool):
            return float(value)
        if base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if origin in (list, tuple):
            inner = typing.get_args(base)[0] if typing.get_args(base) else str
            items = value.split(",") if isinstance(value, str) else value
            if isinstance(items, (list, tuple)):
                return [_file_value(f"{name}[{k}]", item, inner, source) for k, item in enumerate(items) if item != ""]
        if base not in (bool, int, float, str) and origin not in (list, tuple):
            return value  # other field types (e.g. dict) are checked by their consumer
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        pass
    expected = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(base, str(base))
    raise ValueError(f"{source}: {name}: expected {expected}, got {value!r}.")


def read_config_file(path) -> dict:
    """A YAML or JSON config file -> its mapping. A key given twice in one mapping is refused by name: both readers
    would keep the last value without a word."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Config file not found: {path}. Pass an existing YAML or JSON file to --config.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"Config file {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8.") from e
    try:
        if path.suffix == ".json":
            data = json.loads(text, object_pairs_hook=_json_object_with_unique_keys)
        else:  # .yaml / .yml, and anything else: YAML reads JSON too
            data = _yaml_load_with_unique_keys(text) or {}
    except _DuplicateKey as e:
        raise ValueError(f"Config file {path} sets {e.key!r} twice{e.lines}; keep one of them (YAML and JSON readers "
                         "would take the last without a word).") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"Config file {path} is not valid JSON: {e}.") from e
    except Exception as e:  # yaml.YAMLError, and the ValueError of a date like 2020-13-45
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"Config file {path} is not valid YAML ({first_line}; {_yaml_position(e)}).") from e
    if not isinstance(data, dict):
        raise ValueError(f"Config file {path} must hold a mapping of field names to values.")
    return data


class _DuplicateKey(ValueError):
    """A mapping of a config file has `key` twice; `lines`: where, when the reader knows (" (lines 2 and 5)")."""

    def __init__(self, key, lines: str = ""):
        super().__init__(key)
        self.key, self.lines = key, lines


def _json_object_with_unique_keys(pairs: list) -> dict:
    """json's object_pairs_hook: the object as a dict, or _DuplicateKey (json.loads keeps the last silently)."""
    mapping = {}
    for key, value in pairs:
        if key in mapping:
            raise _DuplicateKey(key)
        mapping[key] = value
    return mapping


def _yaml_load_with_unique_keys(text: str):
    """yaml.safe_load, but a mapping key given twice is a _DuplicateKey naming its lines (PyYAML keeps the last
    silently). `<<` merges work as PyYAML defines them: the keys a merge brings may be overridden."""
    import yaml

    merge_tag = "tag:yaml.org,2002:merge"

    class UniqueKeyLoader(yaml.SafeLoader):
        def __init__(self, stream):
            super().__init__(stream)
            self.checked_mappings = set()  # ids of the mapping nodes whose own keys were checked

        def flatten_mapping(self, node):
            """PyYAML's flattening moves the keys of a node's `<<` merges into the node itself (nested merges too,
            into the merged node), and a merged node is flattened again wherever it is used: so each node's own
            keys are taken as it first comes here, before any merged ones join them."""
            if id(node) in self.checked_mappings:
                return super().flatten_mapping(node)
            self.checked_mappings.add(id(node))
            own_keys = [key_node for key_node, _ in node.value if key_node.tag != merge_tag]
            super().flatten_mapping(node)  # (it also makes a `=` key plain text, which can then be constructed)
            lines = {}
            for key_node in own_keys:
                if isinstance(key_node, yaml.ScalarNode):  # (PyYAML refuses sequence and mapping keys: unhashable)
                    key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                    if key in lines:
                        raise _DuplicateKey(key, f" (lines {lines[key]} and {line})")
                    lines[key] = line

    return yaml.load(text, Loader=UniqueKeyLoader)


def read_json(path, expected_type: type, holds: str, fix: str):
    """A JSON file a command reads back -> its value, which must be an `expected_type`; a damaged or unexpected
    one is a ValueError naming the file, what it should hold (`holds`) and what to do (`fix`)."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({e}); it should hold {holds}. {fix}") from e
    if not isinstance(value, expected_type):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}; it should hold {holds}. {fix}")
    return value


def read_utf8_lines(handle, what: str):
    """The lines of a text file opened as UTF-8 (`handle`), with a ValueError naming `what` (the file) and the fix
    in place of Python's bare "'utf-8' codec can't decode byte" (which names neither)."""
    try:
        yield from handle
    except UnicodeDecodeError as e:  # (decoded a chunk at a time: the line is not known)
        raise ValueError(f"{what} is not UTF-8 text ({e.reason}); save the file as UTF-8.") from e


def _yaml_position(error) -> str:
    mark = getattr(error, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "position unknown"


def _module_prog() -> str | None:
    """`python -m train.stage1` for a script run as `python -m` from the train package (argparse would say stage1.py)."""
    import sys

    path = Path(sys.argv[0])
    parts = list(path.with_suffix("").parts)
    if path.suffix != ".py" or "train" not in parts:
        return None
    module = parts[len(parts) - 1 - parts[::-1].index("train"):]
    return "python -m " + ".".join(module[:-1] if module[-1] == "__main__" else module)


def build_parser(config_class, description: str) -> argparse.ArgumentParser:
    # allow_abbrev=False: argparse would otherwise take `--lr 1e-4` for `--lr-power 1e-4`, silently
    # OneValuePerFlagParser: a flag given twice is refused; SUPPRESS: the namespace holds only the flags given
    parser = OneValuePerFlagParser(prog=_module_prog(), description=description, allow_abbrev=False,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=argparse.SUPPRESS,
                        help="YAML or JSON file with any of the fields below")
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        help_text = field.metadata.get("help", "")
        if "default" not in help_text:
            help_text = f"{help_text} (default: {default})"
        if "min" in field.metadata:
            help_text = f"{help_text} (at least {field.metadata['min']})"
        if "max" in field.metadata:
            help_text = f"{help_text} (at most {field.metadata['max']})"
        parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=_flag_type(hints[field.name]),
                            default=argparse.SUPPRESS, help=help_text)
    return parser


def parse_config(config_class, argv=None, description: str = ""):
    """defaults < --config file < explicit flags -> an instance of `config_class`."""
    parser = build_parser(config_class, description)
    args = vars(parser.parse_args(argv))
    values = {}
    config_file = args.pop("config", None)
    if config_file:
        values.update(read_config_file(config_file))
    names = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - names)
    if unknown:
        parser.error(f"unknown config fields {unknown}; valid fields: {sorted(names)}")
    hints = typing.get_type_hints(config_class)
    for key, value in list(values.items()):  # values from the file arrive as YAML / JSON types
        values[key] = _file_value(key, value, hints[key], f"Config file {config_file}")
    values.update(args)  # explicit flags win; argparse typed them
    config = config_class(**values)
    check_minimums(config)
    return config


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def check_minimums(config, label: typing.Callable[[str], str] = flag_name) -> None:
    """A ValueError naming the first field below its `metadata["min"]` (a count or size: 0 batch size,
    steps or crop would loop forever, divide by zero or silently produce nothing; a negative max_*
    would drop items by slicing), above its `metadata["max"]` (a probability), or NaN / infinite (NaN
    passes every comparison, and a NaN or infinite LR or weight trains to NaN without a word).
    `label(field name)` names it: a flag by default."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        low, high = field.metadata.get("min"), field.metadata.get("max")
        if isinstance(value, float) and not math.isfinite(value):  # (an int is finite; isfinite overflows on huge ones)
            raise ValueError(f"{label(field.name)} {value}: must be a finite number.")
        if low is not None and value < low:
            meaning = " (0 = all)" if low == 0 and "0 = all" in field.metadata.get("help", "") else ""
            raise ValueError(f"{label(field.name)} {value}: must be at least {low}{meaning}.")
        if high is not None and value > high:
            raise ValueError(f"{label(field.name)} {value}: must be at most {high}.")


def warn_if_warmup_outlasts_run(cfg) -> None:
    """Warn when `cfg.warmup_steps` >= `cfg.max_steps` (entry points call it once, as a run starts): the whole run
    is linear warm-up, so its learning rate never trains at the peak (e.g. a 200-step fine-tune with the official
    375 warm-up steps). A warning, not a refusal: such a run is well defined and may be meant (a smoke run of a few
    steps, a run to be resumed with more --max-steps); what must not happen is that nobody notices."""
    warmup, steps, peak = cfg.warmup_steps, cfg.max_steps, cfg.learning_rate
    if warmup < steps:
        return
    if warmup == steps:
        reached = f"reaches the peak --learning-rate {peak:g} only at the last update"
    else:  # update n of the warm-up runs at peak * n / warmup
        reached = (f"rises only to {peak * steps / warmup:.3g} by the last update, short of the peak --learning-rate "
                   f"{peak:g}")
    # a tenth of the run, as long runs warm up; a run under 10 steps has no tenth to give: no warm-up
    fix = f"--warmup-steps {steps // 10} (a tenth of the run)" if steps >= 10 else "--warmup-steps 0 (no warm-up)"
    logger.warning(f"--warmup-steps {warmup} >= --max-steps {steps}: the whole run is linear warm-up, so its learning "
                   f"rate {reached}. Give --warmup-steps below --max-steps, e.g. {fix}.")


def flatten_settings(settings: dict, prefix: str = "") -> dict:
    """Nested dicts -> dotted keys, values as they come back from JSON (tuples -> lists)."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_settings(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return json.loads(json.dumps(flat))


def changed_keys(saved: dict, now: dict, may_change=(), common_keys_only: bool = False) -> list[str]:
    """The (flattened) settings that differ between a run's saved settings and this one's, but those in
    `may_change`. A setting on one side only (a field added or removed since the save) reads as None there;
    common_keys_only: such settings are not compared."""
    saved, now = flatten_settings(saved), flatten_settings(now)
    keys = set(saved) & set(now) if common_keys_only else set(saved) | set(now)
    return [key for key in sorted(keys)
            if key.split(".")[0] not in may_change and key not in may_change and saved.get(key) != now.get(key)]


def changed_settings(saved: dict, now: dict, may_change=(), common_keys_only: bool = False) -> list[str]:
    """`"key old -> new"` for each of `changed_keys`; a setting on one side only shows as "(not recorded)" on the
    saved side, "(not set)" on this run's (it read "None", like a recorded null)."""
    keys = changed_keys(saved, now, may_change, common_keys_only)
    saved, now = flatten_settings(saved), flatten_settings(now)
    return [f"{key} {_shown(saved, key, '(not recorded)')} -> {_shown(now, key, '(not set)')}" for key in keys]


def _shown(settings: dict, key: str, missing: str) -> str:
    return repr(settings[key]) if key in settings else missing


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


# What an entry point reports in one line: a ValueError is every error raised on purpose (bad input, a refused
# checkpoint; the core's KosmosGError included); an OSError is the file system refusing (permissions, a name too
# long, a full disk), its message names the path; a ModuleNotFoundError is a package of requirements-train.txt
# that is not installed (the ComfyUI nodes need only requirements.txt).
INPUT_ERRORS = (ValueError, OSError, ModuleNotFoundError, KosmosGError)  # KosmosGError: the core's, e.g. NaN images


def input_error_message(error: Exception) -> str:
    """The one line an entry point prints for an INPUT_ERRORS error."""
    if isinstance(error, ModuleNotFoundError):
        return f"{error}: train/ needs the packages of requirements-train.txt (pip install -r requirements-train.txt)"
    return str(error)


def exit_on_input_error(main):
    """Run `main()`; an INPUT_ERRORS error ends the process with its one-line message and exit code 2 (as
    `python -m kosmosg_core`, train.data and train.eval) instead of a traceback."""
    import sys

    try:
        return main()
    except INPUT_ERRORS as e:
        print(f"error: {input_error_message(e)}", file=sys.stderr)
        sys.exit(2)


def run_entry_point(config_class, train, argv=None, description: str = "", as_script: bool = False):
    """Parse the config and call `train(cfg)`. Run as a script (`python -m ...`): `exit_on_input_error`;
    called from Python (tests), errors propagate."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    def main():
        return train(parse_config(config_class, argv, description=description))

    return exit_on_input_error(main) if as_script else main()
