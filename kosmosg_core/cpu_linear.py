"""CPU inference fast path: `nn.Linear` layers with weights pre-packed for oneDNN.

Why: the MLLM decoder and the aligner multiply few rows (the prompt's 10-300 tokens, the 77
queries) by large weights (2048 x 8192 in the MLLM). On the CPUs this project is benchmarked on,
PyTorch's default float32 CPU matmul runs such few-row products far below the machine's
square-matmul rate, while oneDNN, given weights reordered once into its blocked layout, runs them
much closer to it (official size, 2 threads, 11 tokens: decoder 0.41 s packed vs 0.91 s default).
The vision tower and the connector multiply 257 rows per image, where the default matmul is the
faster one (1 image 1.10 s default vs 1.20 s packed, 3 images 3.40 vs 3.88 s), so
`pack_for_cpu_encode` packs only the decoder and the aligner. The products are the same up to
float32 rounding (~1e-6).

Inference only: float32 on the CPU, no gradients. A packed layer keeps no dense copy of its
weight (the model's memory stays the same); `unpack_linears` restores plain `nn.Linear` layers,
e.g. before moving the model to a GPU.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def cpu_packing_available() -> bool:
    """True when this PyTorch build has oneDNN and its linear-weight packing ops."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's packed layout. Input [..., in_features], float32, CPU."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        # A plain attribute, not a parameter/buffer: `Module.to` must not try to move a oneDNN
        # tensor to another device (forward refuses other devices with a clear message instead).
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32:
            raise RuntimeError(f"PackedLinear runs float32 on the CPU only, got {x.dtype} on {x.device}; call "
                               "kosmosg_core.cpu_linear.unpack_linears(model) before moving or casting the model.")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.packed_weight.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _replace_children(module: nn.Module, convert) -> int:
    count = 0
    for name, child in module.named_children():
        new = convert(child)
        if new is not None:
            setattr(module, name, new)
            count += 1
        else:
            count += _replace_children(child, convert)
    return count


def pack_linears(model: nn.Module) -> int:
    """Replace every float32 CPU `nn.Linear` in `model` by a `PackedLinear` (in place) -> how many.

    Returns 0 (and changes nothing) when this PyTorch has no oneDNN packing."""
    if not cpu_packing_available():
        logger.info("oneDNN weight packing is not available in this PyTorch; keeping the default CPU matmul")
        return 0

    def convert(child):
        if type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype == torch.float32:
            return PackedLinear(child)
        return None

    with torch.no_grad():
        return _replace_children(model, convert)


PACKED_PARTS = ("decoder", "aligner")  # the KosmosG parts whose products have few rows (see above)


def pack_for_cpu_encode(model: nn.Module) -> int:
    """Pack the linear layers of a `KosmosG`'s few-row parts (`PACKED_PARTS`) -> how many."""
    return sum(pack_linears(getattr(model, part)) for part in PACKED_PARTS)


def unpack_linears(model: nn.Module) -> int:
    """Turn every `PackedLinear` back into an `nn.Linear` (in place) -> how many."""
    return _replace_children(model, lambda child: child.to_linear() if isinstance(child, PackedLinear) else None)


def has_packed_linears(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())
