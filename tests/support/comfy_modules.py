"""Import ComfyUI's own modules in-process (no server), for unit tests against the real code.

The tree comes from .ci/setup_env.sh. It is appended to sys.path (the repo's folders keep
priority; our tests never import ComfyUI's top-level `nodes`), and `--cpu` is set before
`comfy.model_management` first loads (the venv's torch is a CUDA build; there is no driver).
Without the tree a test is skipped locally and fails in CI.
"""

from __future__ import annotations

import os
import sys

import pytest

from .comfy_server import COMFY_TREE, comfy_available


def import_comfy():
    if not comfy_available():
        message = f"ComfyUI tree missing at {COMFY_TREE}; run .ci/setup_env.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message, allow_module_level=True)
    if str(COMFY_TREE) not in sys.path:
        sys.path.append(str(COMFY_TREE))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.ops  # noqa: F401  (imports comfy.model_management with --cpu)
    import comfy.sd  # noqa: F401

    return sys.modules["comfy"]
