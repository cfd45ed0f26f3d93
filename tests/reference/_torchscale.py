"""Import PyPI `torchscale==0.3.0` (installed `--no-deps`) without its fairscale / timm dependencies.

torchscale's architecture modules import, at module level,
- `fairscale.nn.checkpoint_wrapper` / `fairscale.nn.wrap`: called only when `checkpoint_activations`
  / `fsdp` are on (training features);
- `timm.models.layers.drop_path`: called only by `DropPath`, built only when `drop_path_rate > 0`.
The reference runs inference with all of these off, so when a package is not installed a stand-in
module is registered whose functions refuse to run (a test that reached them would fail loudly).
Nothing in torchscale itself is patched.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types


def _unused(*args, **kwargs):
    raise RuntimeError("stand-in for an uninstalled torchscale dependency (activation checkpointing / FSDP / "
                       "drop-path): the parity reference runs inference with these off.")


def _stand_in(dotted: str, registered: list[str], **functions) -> None:
    """Register `dotted` (and its parents) as empty modules holding `functions`; record what was added."""
    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
            registered.append(name)
        if i > 1:
            setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], sys.modules[name])
    for attr, fn in functions.items():
        setattr(sys.modules[dotted], attr, fn)


@contextlib.contextmanager
def stand_ins_for_missing_dependencies():
    """Stand-ins exist only while torchscale imports (it binds the names at import time). They are
    removed afterwards, because other libraries (diffusers, transformers) probe `timm` with
    `importlib.util.find_spec`, which fails on a module without a spec."""
    registered: list[str] = []
    if importlib.util.find_spec("fairscale") is None:
        _stand_in("fairscale.nn", registered, checkpoint_wrapper=_unused, wrap=_unused)
    if importlib.util.find_spec("timm") is None:
        _stand_in("timm.models.layers", registered, drop_path=_unused)
    try:
        yield
    finally:
        for name in registered:
            sys.modules.pop(name, None)


with stand_ins_for_missing_dependencies():
    import torchscale  # noqa: E402
    from torchscale.architecture.config import DecoderConfig, EncoderDecoderConfig  # noqa: E402
    from torchscale.architecture.decoder import DecoderLayer  # noqa: E402
    from torchscale.architecture.encoder import EncoderLayer  # noqa: E402
    from torchscale.component.embedding import PositionalEmbedding  # noqa: E402
    from torchscale.component.feedforward_network import FeedForwardNetwork  # noqa: E402
    from torchscale.component.multihead_attention import MultiheadAttention  # noqa: E402

__all__ = ["torchscale", "DecoderConfig", "EncoderDecoderConfig", "DecoderLayer", "EncoderLayer",
           "PositionalEmbedding", "FeedForwardNetwork", "MultiheadAttention"]
