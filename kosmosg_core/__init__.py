"""Kosmos-G inference core: interleaved text + images -> SD1.5 conditioning. No ComfyUI imports."""

from .config import KosmosGConfig
from .errors import KosmosGError

__all__ = ["KosmosGConfig", "KosmosGError", "KosmosGPipeline", "KosmosG", "load_model"]
__version__ = "0.1.0"


def __getattr__(name):  # lazy: importing the package must stay cheap (ComfyUI start-up, CLI --help)
    if name == "KosmosGPipeline":
        from .pipeline import KosmosGPipeline
        return KosmosGPipeline
    if name == "KosmosG":
        from .model import KosmosG
        return KosmosG
    if name == "load_model":
        from .checkpoint import load_model
        return load_model
    raise AttributeError(name)
