"""Kosmos-G for ComfyUI: the pack's entry point (ComfyUI imports this folder as a package)."""

import sys

WEB_DIRECTORY = "./web/js"
REQUIRED_COMFYUI = "0.30.0"  # the oldest ComfyUI tested; pyproject.toml's requires-comfyui says the same


def _missing_node_api() -> str | None:
    """None when this ComfyUI has the V3 node API the pack is written for, else what is missing."""
    try:
        from comfy_api.latest import io
    except ImportError as error:
        return f"comfy_api.latest cannot be imported ({error})"
    if not hasattr(io, "Autogrow"):  # the prompt node's growing image sockets
        return "comfy_api.latest.io has no Autogrow"
    return None


def _comfyui_version() -> str:
    try:
        from comfyui_version import __version__
    except ImportError:
        return "of unknown version"
    return __version__


_missing = _missing_node_api()
if not __package__:
    # Imported as a lone file, not as a package: pytest does that when the checkout's folder name is no Python
    # name (e.g. custom_nodes/ComfyUI-Kosmos-G, as the README clones it); the relative imports below would fail.
    __all__ = ["WEB_DIRECTORY"]
elif _missing is None:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
elif "folder_paths" in sys.modules:
    # Inside a ComfyUI too old for the pack: fail the import with the fix (ComfyUI logs it and marks the
    # pack IMPORT FAILED) instead of loading without nodes and leaving the user to guess why.
    raise ImportError(f"Kosmos-G needs ComfyUI {REQUIRED_COMFYUI} or newer (its V3 node API), but this ComfyUI is "
                      f"{_comfyui_version()} and {_missing}. Update ComfyUI (git pull in its folder, or the "
                      "ComfyUI Manager's 'Update ComfyUI'; portable builds: update/update_comfyui.bat), then restart.")
else:  # pytest and other tools import this package outside ComfyUI
    __all__ = ["WEB_DIRECTORY"]
