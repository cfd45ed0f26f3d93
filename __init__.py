"""Kosmos-G for ComfyUI: the pack's entry point (ComfyUI imports this folder as a package)."""

WEB_DIRECTORY = "./web/js"

try:  # comfy_api exists only inside ComfyUI; pytest and other tools import this package without it
    import comfy_api.latest  # noqa: F401
except ImportError:
    __all__ = ["WEB_DIRECTORY"]
else:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
