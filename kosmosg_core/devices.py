"""Devices and dtypes as every front end names them: "float16" / "fp16" / "half", "cpu" / "cuda:1" / "auto"."""

from __future__ import annotations

import os

import torch

from .config import DTYPE_ALIASES, DTYPE_NAMES
from .errors import DeviceError

# DTYPE_NAMES and their short names (fp32 / fp16 / bf16: ComfyUI's, half: torch's)
DTYPES = {**{name: getattr(torch, name) for name in DTYPE_NAMES},
          **{alias: getattr(torch, name) for alias, name in DTYPE_ALIASES.items()}}


def resolve_dtype(dtype) -> torch.dtype:
    """A dtype name (any case, short names too) or torch.dtype of DTYPE_NAMES -> torch.dtype; else a DeviceError."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise DeviceError(f"Unsupported dtype {dtype!r}; use one of {', '.join(DTYPE_NAMES)}.")


def resolve_device(device) -> torch.device:
    """A device name (or torch.device) this PyTorch can use -> torch.device; a DeviceError naming the fix otherwise.
    "auto": this process's GPU (LOCAL_RANK under accelerate / torchrun) where CUDA is there, else the CPU."""
    if isinstance(device, str) and device.lower() == "auto":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
            torch.device("cpu")
    try:
        device = torch.device(device.lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"Unknown device {device!r}; use 'cpu' or 'cuda' (or 'cuda:N').") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"Device {str(device)!r} was requested but this PyTorch sees no CUDA GPU; use device 'cpu'.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("Device 'mps' was requested but MPS is not available; use device 'cpu'.")
    if device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise DeviceError("Device 'xpu' was requested but this PyTorch sees no Intel GPU; use device 'cpu'.")
    if device.type == "meta":  # tensors without data: the weights would be lost
        raise DeviceError("Device 'meta' holds no data; use 'cpu' or 'cuda'.")
    if device.type not in ("cpu", "cuda", "mps", "xpu") and not device_usable(device):
        raise DeviceError(f"Unsupported device {str(device)!r}: this PyTorch cannot make tensors there; use 'cpu' or "
                          "'cuda'.")
    return device


def canonical_device(device) -> torch.device:
    """One name per device, as tensors there report it: "CPU" and "cpu:0" -> cpu; "cuda" -> cuda:<current GPU>
    (cuda:0 where this PyTorch sees none); "mps" -> mps:0. Nothing is allocated: it also names devices this
    machine lacks (e.g. a PNG record's)."""
    device = torch.device(device.lower() if isinstance(device, str) else device)
    if device.type == "cpu":
        return torch.device("cpu")
    if device.index is None:
        index = torch.cuda.current_device() if device.type == "cuda" and torch.cuda.is_available() else 0
        return torch.device(device.type, index)
    return device


def device_usable(device: torch.device) -> bool:
    """True when this PyTorch can make a tensor on `device`: the other backends ComfyUI runs on (DirectML's
    'privateuseone', Ascend 'npu', ...) work where their plugin is installed."""
    try:
        torch.empty(1, device=device)
    except Exception:  # backends fail in their own ways (NotImplementedError, AssertionError, ImportError...)
        return False
    return True
