"""CPU inference fast paths: `nn.Linear` layers with weights pre-packed for a faster kernel.

Why: the MLLM decoder and the aligner multiply few rows (the prompt's 10-300 tokens, the 77
queries) by large weights (2048 x 8192 in the MLLM). On the CPUs this project is benchmarked on,
PyTorch's default float32 CPU matmul runs such few-row products far below the machine's
square-matmul rate. Two kernels for these few-row parts, chosen by `cpu_kernel` ("auto", the
default, takes the AVX2 kernel where it builds, else oneDNN, and never fails):
- "onednn": oneDNN, given weights reordered once into its blocked layout (official size,
  2 threads, 11 tokens: decoder 0.41 s vs 0.91 s default). Ships with PyTorch.
- "avx2": this package's own AVX2 kernel (`csrc/few_row_linear.cpp`), which overlaps
  streaming the weights with computing (the decoder's products at 11 rows, official shapes:
  ~150-180 vs ~125-160 GFLOP/s oneDNN; 75-77 rows within 5 %; 205 rows ~5 % slower). Built on
  first use by `torch.utils.cpp_extension` (a C++ compiler and ninja; about 30 s once, then
  cached by torch).
The vision tower and the connector multiply 257 rows per image; there oneDNN's packed weights
are used with either kernel (alternating A/B, 2026-12-06: 1 image 0.93-0.95 s vs 1.04-1.06 s
default, 3 images 2.71-2.83 s vs 2.96-3.00 s; the AVX2 kernel 0.98-1.00 / 2.98-3.09 s).
The products are the same up to float32 rounding (~1e-5).
bfloat16 weights are packed for oneDNN where the CPU has native bf16 (`packs_dtype`).

Inference only: float32 or bfloat16 on the CPU, no gradients. A packed layer keeps no dense copy of its
weight (the model's memory stays the same); `unpack_linears` restores plain `nn.Linear` layers,
e.g. before moving the model to a GPU.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from .errors import DeviceError

logger = logging.getLogger(__name__)


def cpu_packing_available() -> bool:
    """True when this PyTorch build has oneDNN and its linear-weight packing ops."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


# What a PackedLinear runs, and the weight dtypes each packs; "auto" resolves to one of them.
KERNEL_DTYPES = {"onednn": (torch.float32, torch.bfloat16), "avx2": (torch.float32,)}
CPU_KERNELS = tuple(KERNEL_DTYPES)
_AVX2_SOURCE = Path(__file__).resolve().parent / "csrc" / "few_row_linear.cpp"
_avx2_module = None
_avx2_build_error: DeviceError | None = None  # a failed build is not retried in this process


def avx2_kernel_unavailable_reason() -> str | None:
    """None when the AVX2 kernel can be built here, else why not (and what would fix it)."""
    from torch.utils import cpp_extension

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"this CPU is {platform.machine()}, not x86-64"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"this CPU has no AVX2 (PyTorch reports {capability})"
    if not sys.platform.startswith("linux"):
        return "building it is supported on Linux only (gcc or clang with OpenMP)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler was found (install g++ or clang, or set CXX)"
    return None


def _cpu_has_avx512vl() -> bool:
    # PyTorch reports "AVX512" only for CPUs with AVX-512 F/BW/VL/DQ (its own AVX512 kernels need them)
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def _build_avx2_kernel(avx512vl: bool):
    """Compile (or take from torch's cache) `csrc/few_row_linear.cpp`; with `avx512vl` the kernel
    gets 32 vector registers and a 12-row register tile, without it 16 registers and 6 rows."""
    from torch.utils.cpp_extension import load

    isa_flags = ["-mavx2", "-mfma"] + (["-mavx512f", "-mavx512vl"] if avx512vl else [])
    name = "kosmosg_few_row_linear" + ("_avx512vl" if avx512vl else "_avx2")
    logger.info("Kosmos-G: building the AVX2 few-row linear kernel (%s; once, cached by torch)", name)
    try:
        # OpenMP: at::parallel_for is inlined into the extension and runs on one thread without it
        return load(name=name, sources=[str(_AVX2_SOURCE)], extra_cflags=["-O3", "-fopenmp", *isa_flags],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # a compiler / linker failure: its log is in the message
        raise DeviceError(f"cpu_kernel='avx2': building {_AVX2_SOURCE.name} failed ({error}). "
                          "Use cpu_kernel='onednn'.") from error


def load_avx2_kernel():
    """Build (first call only; torch caches the build) and import the AVX2 few-row kernel, with the
    12-row tile where the CPU has AVX-512VL."""
    global _avx2_module, _avx2_build_error
    if _avx2_module is None:
        reason = avx2_kernel_unavailable_reason()
        if reason is not None:
            raise DeviceError(f"cpu_kernel='avx2' is unavailable: {reason}. Use cpu_kernel='onednn'.")
        if _avx2_build_error is not None:
            raise _avx2_build_error
        try:
            _avx2_module = _build_avx2_kernel(avx512vl=_cpu_has_avx512vl())
        except DeviceError as error:
            _avx2_build_error = error
            raise
    return _avx2_module


def resolve_cpu_kernel(kernel: str) -> str:
    """"auto" -> "avx2" when the AVX2 kernel is built or builds here, else "onednn" (logged, never
    an error: both give the same products); "onednn" / "avx2" are returned as they are."""
    if kernel != "auto":
        if kernel not in CPU_KERNELS:
            raise DeviceError(f"Unknown cpu_kernel {kernel!r}: use auto, {', '.join(CPU_KERNELS)}.")
        return kernel
    reason = avx2_kernel_unavailable_reason()
    if reason is not None:
        logger.info("Kosmos-G: using oneDNN for the CPU linear layers (the AVX2 kernel is unavailable: %s)", reason)
        return "onednn"
    try:
        load_avx2_kernel()
    except DeviceError as error:
        logger.warning("Kosmos-G: using oneDNN for the CPU linear layers: %s", error)
        return "onednn"
    return "avx2"


def packs_dtype(dtype: torch.dtype) -> bool:
    """Whether CPU weights of this dtype get packed: float32 always (either kernel), bfloat16 for
    oneDNN where this CPU has native bf16 (AVX512-BF16 / AMX: 11 rows x 2048 x 8192, 2 threads,
    ~320 vs ~175 GFLOP/s plain `F.linear`, identical outputs); float16 never."""
    if dtype == torch.float32:
        return True
    ops = torch.ops.mkldnn
    return (dtype == torch.bfloat16 and cpu_packing_available() and hasattr(ops, "_is_mkldnn_bf16_supported")
            and ops._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in a kernel's packed layout. Input [..., in_features] on the CPU, in
    the weight's dtype.

    kernel "onednn": oneDNN's blocked layout (float32 or bfloat16); "avx2": panels
    [ceil(out / 16), in, 16] for `csrc/few_row_linear.cpp` (float32)."""

    def __init__(self, linear: nn.Linear, kernel: str = "onednn"):
        super().__init__()
        if kernel not in CPU_KERNELS:
            raise DeviceError(f"Unknown cpu_kernel {kernel!r}: use one of {', '.join(CPU_KERNELS)}.")
        weight = linear.weight.detach()
        if weight.dtype not in KERNEL_DTYPES[kernel]:
            raise DeviceError(f"cpu_kernel {kernel!r} does not pack {weight.dtype} weights (see cpu_linear.packs_dtype).")
        self.in_features, self.out_features, self.kernel = linear.in_features, linear.out_features, kernel
        self.dtype = weight.dtype
        # A plain attribute, not a parameter/buffer: `Module.to` must not try to move a packed
        # tensor to another device (forward refuses other devices with a clear message instead).
        if kernel == "onednn":
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        else:
            self.packed_weight = load_avx2_kernel().pack_weight(weight.contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != self.dtype:
            raise RuntimeError(f"This PackedLinear runs {self.dtype} on the CPU only, got {x.dtype} on {x.device}; call "
                               "kosmosg_core.cpu_linear.unpack_linears(model) before moving or casting the model.")
        if self.kernel == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        rows = x.reshape(-1, self.in_features).contiguous()  # [M, in]
        y = load_avx2_kernel().linear(rows, self.packed_weight, self.out_features, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The weight [out, in] back from the packed layout."""
        if self.kernel == "onednn":
            return self.packed_weight.to_dense()
        return self.packed_weight.transpose(1, 2).reshape(-1, self.in_features)[:self.out_features]

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=self.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.dtype}, kernel={self.kernel}")


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


def pack_linears(model: nn.Module, kernel: str = "auto") -> int:
    """Replace every CPU `nn.Linear` of a dtype that `packs_dtype` accepts by a `PackedLinear` (in
    place) -> how many. float32 layers get `kernel` (see `resolve_cpu_kernel`), bfloat16 ones oneDNN.

    Where this PyTorch has no oneDNN packing, oneDNN layers stay as they are; kernel "avx2" raises
    `DeviceError` with the reason when its kernel cannot be built here."""
    float32_kernel = None  # resolved at the first float32 layer: a bf16 model never builds the AVX2 kernel

    def convert(child):
        nonlocal float32_kernel
        if type(child) is not nn.Linear or child.weight.device.type != "cpu" or not packs_dtype(child.weight.dtype):
            return None
        if child.weight.dtype != torch.float32:  # bfloat16: oneDNN only (KERNEL_DTYPES)
            return PackedLinear(child, "onednn")
        if float32_kernel is None:
            float32_kernel = resolve_cpu_kernel(kernel)
        if float32_kernel == "onednn" and not cpu_packing_available():
            return None
        return PackedLinear(child, float32_kernel)

    with torch.no_grad():
        return _replace_children(model, convert)


FEW_ROW_PARTS = ("decoder", "aligner")  # prompt tokens, 77 queries: packed for `cpu_kernel`
IMAGE_PARTS = ("vision", "connector")  # 257 rows per image: packed for oneDNN (see above)


def pack_for_cpu_encode(model: nn.Module, kernel: str = "auto") -> int:
    """Pack the linear layers of a `KosmosG` for CPU encodes -> how many: the few-row parts
    (`FEW_ROW_PARTS`) for `kernel`, the image parts (`IMAGE_PARTS`) for oneDNN."""
    return (sum(pack_linears(getattr(model, part), kernel) for part in FEW_ROW_PARTS)
            + sum(pack_linears(getattr(model, part), "onednn") for part in IMAGE_PARTS))


def unpack_linears(model: nn.Module) -> int:
    """Turn every `PackedLinear` back into an `nn.Linear` (in place) -> how many."""
    return _replace_children(model, lambda child: child.to_linear() if isinstance(child, PackedLinear) else None)


def has_packed_linears(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())
