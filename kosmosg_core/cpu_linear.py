"""CPU inference fast paths: `nn.Linear` layers with weights pre-packed for a faster kernel.

Why: the MLLM decoder and the aligner's input encoder multiply few rows (the prompt's 10-300
tokens) by large weights (2048 x 8192 in the MLLM). On the CPUs this project is benchmarked on,
PyTorch's default CPU matmul runs such few-row products far below the machine's square-matmul
rate. Two kernels for the layers that multiply the prompt's tokens, chosen by `cpu_kernel`
("auto", the default, takes the few-row kernel where it builds, else oneDNN, and never fails):
- "onednn": oneDNN, given weights reordered once into its blocked layout (official size,
  2 threads, 11 tokens: decoder 0.41 s vs 0.91 s default). Ships with PyTorch.
- "few-row": this package's own kernel (`csrc/few_row_linear.cpp`), which overlaps streaming the
  weights with computing. float32 on AVX2 CPUs (the decoder's products at 11 rows, official
  shapes: ~135-180 vs ~110-160 GFLOP/s oneDNN; at 75-205 rows ~0-10 % slower); bfloat16 where the
  CPU has AVX512-BF16 (11 rows: ~260-360 vs ~150-290 GFLOP/s oneDNN; 75-205 rows ~0-8 % slower;
  alternating in one process). Built on first use by `torch.utils.cpp_extension` (a C++ compiler and ninja; about 30 s
  once, then cached by torch).
Layers that multiply a fixed, larger number of rows get oneDNN with either choice: the vision
tower and connector (257 rows per image; alternating A/B, 2026-12-06: 3 images 2.71-2.83 s vs
2.96-3.00 s default, the few-row kernel 2.98-3.09 s) and the aligner's 77-query layers (at 77 rows
the two kernels are within a few % of each other: float32 ~185-200, bfloat16 ~330-375 GFLOP/s). The products are the same up to
rounding (float32 ~1e-5; bfloat16 both accumulate in float32 and round once).

Inference only: float32 or bfloat16 on the CPU, no gradients. A packed layer keeps no dense copy of its
weight (the model's memory stays the same); `unpack_linears` restores plain `nn.Linear` layers,
e.g. before moving the model to a GPU.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from .config import CPU_KERNELS
from .errors import DeviceError

logger = logging.getLogger(__name__)


def cpu_packing_available() -> bool:
    """True when this PyTorch build has oneDNN and its linear-weight packing ops."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


_FEW_ROW_SOURCE = Path(__file__).resolve().parent / "csrc" / "few_row_linear.cpp"
_few_row_module = None
_few_row_build_error: DeviceError | None = None  # a failed build is not retried in this process


def _cpp_extension():
    """`torch.utils.cpp_extension`, imported without its CUDA_HOME warning.

    Its import looks for a CUDA toolkit and warns "No CUDA runtime is found" on a machine that has nvcc but no
    GPU; the few-row kernel is a CPU-only build, so that warning would only puzzle the user."""
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        cpp_logger.setLevel(level)
    return cpp_extension


def few_row_kernel_unavailable_reason() -> str | None:
    """None when the few-row kernel can be built here, else why not (and what would fix it)."""
    cpp_extension = _cpp_extension()

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


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# Instruction-set builds of the few-row kernel: compiler flags per build, best first.
FEW_ROW_BUILDS = {
    "avx512bf16": ["-mavx2", "-mfma", "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512bf16"],  # + bfloat16
    "avx512vl": ["-mavx2", "-mfma", "-mavx512f", "-mavx512vl"],  # 32 vector registers: 12-row tiles
    "avx2": ["-mavx2", "-mfma"],  # 16 vector registers: 6-row tiles
}


def few_row_build_for_this_cpu() -> str:
    """The best `FEW_ROW_BUILDS` entry this CPU runs (call after `few_row_kernel_unavailable_reason`)."""
    # PyTorch reports "AVX512" only for CPUs with AVX-512 F/BW/VL/DQ (its own AVX512 kernels need them)
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return "avx2"
    return "avx512bf16" if "avx512_bf16" in _cpu_flags() else "avx512vl"


def _content_addressed_source() -> Path:
    """The kernel's source copied to a path that depends only on its content (under ~/.cache/kosmosg/csrc/):
    torch's build cache (ninja) rebuilds when the source's path changes, so every checkout of the pack (a
    second ComfyUI, each CI clone) would compile it again (~30 s). The pack's own file where no copy can be made."""
    from .files import write_text_atomic

    text = _FEW_ROW_SOURCE.read_text(encoding="utf-8")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kosmosg" / "csrc"
    path = cache / hashlib.sha256(text.encode("utf-8")).hexdigest()[:16] / _FEW_ROW_SOURCE.name
    try:
        if not path.is_file():
            write_text_atomic(path, text)
        return path
    except OSError as error:
        logger.info("Kosmos-G: building %s from the pack (%s)", _FEW_ROW_SOURCE, error)
        return _FEW_ROW_SOURCE


def _build_few_row_kernel(build: str):
    """Compile (or take from torch's cache) `csrc/few_row_linear.cpp` with `FEW_ROW_BUILDS[build]`."""
    name = f"kosmosg_few_row_linear_{build}"
    logger.info("Kosmos-G: building the few-row linear kernel (%s; once, cached by torch)", name)
    try:
        # OpenMP: at::parallel_for is inlined into the extension and runs on one thread without it
        return _cpp_extension().load(name=name, sources=[str(_content_addressed_source())], verbose=False,
                    extra_cflags=["-O3", "-fopenmp", *FEW_ROW_BUILDS[build]], extra_ldflags=["-fopenmp"])
    except Exception as error:  # a compiler / linker failure: its log is in the message
        raise DeviceError(f"cpu_kernel='few-row': building {_FEW_ROW_SOURCE.name} ({build}) failed ({error}). "
                          "Use cpu_kernel='onednn'.") from error


def load_few_row_kernel():
    """Build (first call only; torch caches the build) and import the few-row kernel, the best build
    for this CPU (`few_row_build_for_this_cpu`)."""
    global _few_row_module, _few_row_build_error
    if _few_row_module is None:
        reason = few_row_kernel_unavailable_reason()
        if reason is not None:
            raise DeviceError(f"cpu_kernel='few-row' is unavailable: {reason}. Use cpu_kernel='onednn'.")
        if _few_row_build_error is not None:
            raise _few_row_build_error
        try:
            _few_row_module = _build_few_row_kernel(few_row_build_for_this_cpu())
        except DeviceError as error:
            _few_row_build_error = error
            raise
    return _few_row_module


def resolve_cpu_kernel(kernel: str) -> str:
    """"auto" -> "few-row" when the few-row kernel is built or builds here, else "onednn" (logged,
    never an error: both give the same products); "onednn" / "few-row" are returned as they are."""
    if kernel != "auto":
        if kernel not in CPU_KERNELS:
            raise DeviceError(f"Unknown cpu_kernel {kernel!r}: use auto, {', '.join(CPU_KERNELS)}.")
        return kernel
    reason = few_row_kernel_unavailable_reason()
    if reason is not None:
        logger.info("Kosmos-G: using oneDNN for the CPU linear layers (the few-row kernel is unavailable: %s)", reason)
        return "onednn"
    try:
        load_few_row_kernel()
    except DeviceError as error:
        logger.warning("Kosmos-G: using oneDNN for the CPU linear layers: %s", error)
        return "onednn"
    return "few-row"


def _onednn_has_native_bf16() -> bool:
    ops = torch.ops.mkldnn
    return cpu_packing_available() and hasattr(ops, "_is_mkldnn_bf16_supported") and ops._is_mkldnn_bf16_supported()


def packs_dtype(dtype: torch.dtype) -> bool:
    """Whether CPU weights of this dtype get packed: float32 always (either kernel), bfloat16 where
    this CPU has native bf16 (AVX512-BF16 / AMX: 11 rows x 2048 x 8192, 2 threads, oneDNN ~320 vs
    ~175 GFLOP/s plain `F.linear`, identical outputs); float16 never."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _onednn_has_native_bf16())


def packs_by_default(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model that encodes on `device` in `dtype` is packed (`pack_for_cpu_encode`) when loaded:
    on the CPU, in a dtype `packs_dtype` packs. A model that will move to a GPU must stay plain."""
    return device.type == "cpu" and packs_dtype(dtype)


def kernel_runs_dtype(kernel: str, dtype: torch.dtype) -> bool:
    """Whether `kernel` runs weights of `dtype` here: both run float32; oneDNN bfloat16 where
    `packs_dtype` says so, the few-row kernel bfloat16 where its build has AVX512-BF16."""
    if dtype == torch.float32:
        return True
    if dtype != torch.bfloat16 or not packs_dtype(dtype):
        return False
    return kernel == "onednn" or load_few_row_kernel().has_bfloat16()


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in a kernel's packed layout. Input [..., in_features] on the CPU, in
    the weight's dtype.

    kernel "onednn": oneDNN's blocked layout; "few-row": panels [ceil(out / cols), ceil(in / step),
    cols, step] for `csrc/few_row_linear.cpp` (float32: 16 columns x 1; bfloat16: 32 x 2)."""

    def __init__(self, linear: nn.Linear, kernel: str = "onednn"):
        super().__init__()
        if kernel not in CPU_KERNELS:
            raise DeviceError(f"Unknown cpu_kernel {kernel!r}: use one of {', '.join(CPU_KERNELS)}.")
        weight = linear.weight.detach()
        if not kernel_runs_dtype(kernel, weight.dtype):
            raise DeviceError(f"cpu_kernel {kernel!r} does not run {weight.dtype} weights on this CPU "
                              "(see cpu_linear.kernel_runs_dtype).")
        self.in_features, self.out_features, self.kernel = linear.in_features, linear.out_features, kernel
        self.dtype = weight.dtype
        # A plain attribute, not a parameter/buffer: `Module.to` must not try to move a packed
        # tensor to another device (forward refuses other devices with a clear message instead).
        if kernel == "onednn":
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        else:
            self.packed_weight = load_few_row_kernel().pack_weight(weight.contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != self.dtype:
            raise RuntimeError(f"This PackedLinear runs {self.dtype} on the CPU only, got {x.dtype} on {x.device}; call "
                               "kosmosg_core.cpu_linear.unpack_linears(model) before moving or casting the model.")
        if self.kernel == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        rows = x.reshape(-1, self.in_features).contiguous()  # [M, in]
        y = load_few_row_kernel().linear(rows, self.packed_weight, self.out_features, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The weight [out, in] back from the packed layout."""
        if self.kernel == "onednn":
            return self.packed_weight.to_dense()
        panels, steps, cols, step = self.packed_weight.shape
        dense = self.packed_weight.permute(0, 2, 1, 3).reshape(panels * cols, steps * step)  # padded [out, in]
        return dense[:self.out_features, :self.in_features]

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


def _replace_children(module: nn.Module, convert, prefix: str = "") -> int:
    """Replace each descendant for which `convert(qualified_name, child)` returns a module -> how many."""
    count = 0
    for name, child in module.named_children():
        new = convert(prefix + name, child)
        if new is not None:
            setattr(module, name, new)
            count += 1
        else:
            count += _replace_children(child, convert, prefix + name + ".")
    return count


def pack_linears(model: nn.Module, kernel: str = "auto", layers=None) -> int:
    """Replace every CPU `nn.Linear` of a dtype that `packs_dtype` accepts by a `PackedLinear` (in
    place) -> how many. Layers get `kernel` (see `resolve_cpu_kernel`) where it runs their dtype
    (`kernel_runs_dtype`), else oneDNN. `layers`: if given, a predicate on a layer's qualified name
    in `model` (e.g. "decoder.layers.0.fc1"); only the layers it accepts are packed.

    Where this PyTorch has no oneDNN packing, oneDNN layers stay as they are; kernel "few-row" raises
    `DeviceError` with the reason when its kernel cannot be built here."""
    resolved = None  # resolved at the first packable layer: a model with none never builds the kernel

    def convert(name, child):
        nonlocal resolved
        if type(child) is not nn.Linear or child.weight.device.type != "cpu" or not packs_dtype(child.weight.dtype):
            return None
        if layers is not None and not layers(name):
            return None
        if resolved is None:
            resolved = resolve_cpu_kernel(kernel)
        layer_kernel = resolved if kernel_runs_dtype(resolved, child.weight.dtype) else "onednn"
        if layer_kernel == "onednn" and not cpu_packing_available():
            return None
        return PackedLinear(child, layer_kernel)

    with torch.no_grad():
        return _replace_children(model, convert)


def multiplies_prompt_tokens(name: str) -> bool:
    """Whether the linear layer `name` of a `KosmosG` multiplies the prompt's tokens (10-300 rows):
    those of the MLLM decoder, of the aligner's input encoder and the key/value projections of the
    aligner queries' cross-attention. Every other layer multiplies a fixed, larger number of rows:
    257 per image (vision tower, connector) or the aligner's 77 queries."""
    return (name.startswith(("decoder.", "aligner.encoder_proj."))
            or (name.startswith("aligner.encoder.") and name.endswith((".encoder_attn.k_proj", ".encoder_attn.v_proj"))))


def pack_for_cpu_encode(model: nn.Module, kernel: str = "auto") -> int:
    """Pack the linear layers of a `KosmosG` for CPU encodes -> how many: those that multiply the
    prompt's tokens (`multiplies_prompt_tokens`) for `kernel`, all others for oneDNN (faster there)."""
    return pack_linears(model, kernel, layers=multiplies_prompt_tokens) + pack_linears(model, "onednn")


def kernels_after_packing(dtype: torch.dtype, kernel: str = "auto") -> str:
    """What `linear_kernels` gives for a CPU `KosmosG` in `dtype` once `pack_for_cpu_encode(model, kernel)` has run,
    without the model: a pipeline whose weights are not read yet keys its caches by it."""
    if not packs_dtype(dtype):
        return "torch"
    resolved = resolve_cpu_kernel(kernel)
    if resolved == "few-row":
        load_few_row_kernel()  # asked for by name: a DeviceError with the reason where it cannot be built, as packing
    # the prompt-token layers get the kernel where it runs the dtype, every other layer oneDNN; oneDNN layers stay
    # plain where this PyTorch cannot pack them
    kernels = {resolved if kernel_runs_dtype(resolved, dtype) else "onednn", "onednn"}
    if not cpu_packing_available():
        kernels.discard("onednn")
    return "+".join(sorted(kernels)) or "torch"


def unpack_linears(model: nn.Module) -> int:
    """Turn every `PackedLinear` back into an `nn.Linear` (in place) -> how many."""
    return _replace_children(model, lambda name, child: child.to_linear() if isinstance(child, PackedLinear) else None)


def has_packed_linears(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())


def linear_kernels(model: nn.Module) -> str:
    """What runs the model's linear layers, e.g. "onednn+few-row" or "torch" (none packed): their last bits
    differ, so the pipeline's caches key by it."""
    return "+".join(sorted({m.kernel for m in model.modules() if isinstance(m, PackedLinear)})) or "torch"
