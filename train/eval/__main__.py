"""`python -m train.eval SUB-COMMAND [flags]`: evaluation sub-commands, each its own module.

A sub-command is a module with `DESCRIPTION` (one line), a config dataclass read by
train.common.config.parse_config (`--config FILE` + flag overrides) and `main(argv) -> dict`; the
dict is printed as JSON. Register a new one by adding it to SUBCOMMANDS.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys

from train.common.config import INPUT_ERRORS, input_error_message

SUBCOMMANDS = {
    "dreambench": "train.eval.dreambench",
    "fid": "train.eval.fid",
    "generate-coco": "train.eval.coco",
    "nano": "train.eval.nano_kosmosg",
    "nano-image": "train.eval.nano_image",
}
PROG = "python -m train.eval"


def usage() -> str:
    lines = [f"usage: {PROG} {{{','.join(SUBCOMMANDS)}}} [--help] [--config FILE] [flags]", "",
             "Evaluate Kosmos-G checkpoints with models given by local path (nothing is downloaded).", "",
             "sub-commands:"]
    for name, module in SUBCOMMANDS.items():
        lines.append(f"  {name:<15}{importlib.import_module(module).DESCRIPTION}")
    lines += ["", f"`{PROG} SUB-COMMAND --help` lists its flags; docs/evaluation.md explains the metrics."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"{PROG}: unknown sub-command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    module = importlib.import_module(SUBCOMMANDS[name])
    try:
        result = module.main(rest)
    except INPUT_ERRORS as e:  # bad input: the message names the flag and the fix; no traceback
        print(f"{PROG} {name}: error: {input_error_message(e)}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
