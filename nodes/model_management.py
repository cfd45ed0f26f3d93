"""Loaded Kosmos-G models under ComfyUI's memory manager.

The Loader checks the file and reads its config and tokenizer; the weights are read the first time the
model computes (a lazy `KosmosGPipeline`): an encode whose results the disk cache holds, e.g. after a
restart, costs no load. Then the torch module is built on the offload device (CPU unless --gpu-only)
and wrapped in a `ModelPatcher`; `comfy.model_management.load_models_gpu` moves it to the load device
right before encoding and may offload it again when the U-Net needs the memory.

A loaded model is shared, not owned, here: the registry below holds weak references, so a model lives
exactly as long as ComfyUI keeps the Loader's output (its node cache); two Loaders (or workflows)
naming the same file, dtype and device share one copy, and ComfyUI's "free model and node cache"
(or a changed Loader input under the default cache) releases the memory, as with stock loaders.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import comfy.model_management as mm
import comfy.model_patcher
import torch
from comfy.cli_args import args

logger = logging.getLogger(__name__)

DTYPE_CHOICES = ["auto", "fp16", "bf16", "fp32"]
DEVICE_CHOICES = ["auto", "cpu", "gpu"]  # and each GPU by name ("cuda:1") where there are several: device_choices()
_GPU_BY_NAME = re.compile(r"^(cuda|xpu):(\d+)$")


@dataclass
class KosmosGModel:
    """The value of a KOSMOSG_MODEL socket: the core pipeline (lazy: weights read on first use) plus, once they
    are read, its ComfyUI patcher, and Kosmos-G Encode's recent results with it (`encodings`: they live as long
    as the model, so ComfyUI's "free model and node cache" frees them too)."""

    pipeline: object  # kosmosg_core.pipeline.KosmosGPipeline
    name: str
    cache_key: tuple
    load_device: torch.device
    offload_device: torch.device
    weight_bytes: int  # the weights' size in their dtype: what the memory manager counts
    _patcher: comfy.model_patcher.ModelPatcher | None = None
    encodings: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)  # Encode's key -> results

    @property
    def context_dim(self) -> int:
        return self.pipeline.context_dim

    @property
    def patcher(self) -> comfy.model_patcher.ModelPatcher | None:
        """The model under the memory manager once its weights are read, else None. Never reads them: ComfyUI's
        executor looks up `patcher` on every node output it passes on (its model tracker, its RAM-pressure cache),
        and a workflow whose encodings all come from the disk cache must not read the weights."""
        return self._patcher

    def loaded_patcher(self) -> comfy.model_patcher.ModelPatcher:
        """The model under the memory manager; the weights are read here the first time (on the offload device)."""
        if self._patcher is None:
            model = self.pipeline.load()  # logs "reading the weights of ..."
            # CoreModelPatcher: the patcher ComfyUI picks for its own models (plain ModelPatcher before early 2026)
            patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
            self._patcher = patcher_class(model, load_device=self.load_device, offload_device=self.offload_device,
                                          size=self.weight_bytes)
        return self._patcher

    def load_for_encoding(self) -> None:
        """Read the weights if not yet, and ask the memory manager to put the model on its load device (evicting
        others if needed).

        force_full_load: our plain torch layers cannot run partially offloaded (no comfy.ops casts)."""
        mm.load_models_gpu([self.loaded_patcher()], force_full_load=True)


_LOADED: "weakref.WeakValueDictionary[tuple, KosmosGModel]" = weakref.WeakValueDictionary()


def _gpu_count(kind: str) -> int:
    if kind == "cuda":
        return torch.cuda.device_count()
    if kind == "xpu" and hasattr(torch, "xpu"):
        return torch.xpu.device_count()
    return 1  # mps, directml...: one device


def device_choices() -> list[str]:
    """The Loader's device options: DEVICE_CHOICES, plus each GPU by name ("cuda:0", "cuda:1"...) where ComfyUI's
    PyTorch sees several, so the encoder can have a GPU of its own (users ask for a second-device option)."""
    main = mm.get_torch_device()
    count = _gpu_count(main.type) if main.type in ("cuda", "xpu") else 1
    return DEVICE_CHOICES + ([f"{main.type}:{i}" for i in range(count)] if count > 1 else [])


def resolve_devices(device_choice: str) -> tuple[torch.device, torch.device]:
    """'auto' = ComfyUI's text-encoder device (GPU unless low-VRAM), 'gpu' = the main compute device,
    'cpu' = stay on the CPU, 'cuda:N' = that GPU. Returns (load_device, offload_device)."""
    if device_choice == "cpu":
        cpu = torch.device("cpu")
        return cpu, cpu
    named = _GPU_BY_NAME.match(device_choice)
    if device_choice == "gpu" or named:
        if mm.vram_state == mm.VRAMState.NO_VRAM:  # the memory manager would leave the weights on the CPU and
            # stream them (comfy.ops casts), which plain torch layers cannot: it would compute on the CPU in the
            # GPU's dtype while everything said the GPU
            logger.warning("Kosmos-G Loader: device=%s under --novram: the model computes on the CPU (it cannot "
                           "stream its weights to the GPU); start ComfyUI without --novram to encode on the GPU",
                           device_choice)
            cpu = torch.device("cpu")
            return cpu, cpu
        offload = mm.text_encoder_offload_device()
        if not named:
            return mm.get_torch_device(), offload
        if device_choice not in device_choices():  # e.g. a workflow from a machine with more GPUs
            raise ValueError(f"device {device_choice!r}: this machine's PyTorch sees no such GPU; choose one of "
                             f"{device_choices()} in the Kosmos-G Loader.")
        load = torch.device(device_choice)
        # --gpu-only / --highvram keep idle models on the main GPU; a GPU of its own keeps this one there instead
        return load, offload if offload.type == "cpu" else load
    if device_choice == "auto":
        return mm.text_encoder_device(), mm.text_encoder_offload_device()
    raise ValueError(f"device must be one of {device_choices()}, got {device_choice!r}.")


def choose_dtype(dtype_choice: str, load_device: torch.device) -> torch.dtype:
    """'auto': fp32 on the CPU (fp16 matmuls there are slow or missing); on a GPU the --*-text-enc
    flags if given, else bf16 where supported (no fp16 overflow), else fp16, else fp32."""
    if dtype_choice not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {dtype_choice!r}.")
    if dtype_choice != "auto":
        from ..kosmosg_core.devices import resolve_dtype

        return resolve_dtype(dtype_choice)
    if mm.is_device_cpu(load_device):
        return torch.float32
    if args.fp32_text_enc:
        return torch.float32
    if args.fp16_text_enc:
        return torch.float16
    if args.bf16_text_enc:
        return torch.bfloat16
    if mm.should_use_bf16(load_device, prioritize_performance=False):
        return torch.bfloat16
    if mm.should_use_fp16(load_device, prioritize_performance=False):
        return torch.float16
    return torch.float32


def load_model(path: str, name: str, dtype_choice: str, device_choice: str) -> KosmosGModel:
    """Open a checkpoint (checked, config and tokenizer read, weights on first use), or share the copy still alive
    for the same files (the checkpoint's and its tokenizer's and config's path, mtime, size), dtype and devices."""
    from ..kosmosg_core.checkpoint import model_nbytes
    from ..kosmosg_core.cpu_linear import packs_by_default
    from ..kosmosg_core.pipeline import KosmosGPipeline
    from .paths import checkpoint_fingerprint

    load_device, offload_device = resolve_devices(device_choice)
    dtype = choose_dtype(dtype_choice, load_device)
    # the tokenizer and config files beside an official .pt too: replaced, they make another model
    key = (checkpoint_fingerprint(path), str(dtype), str(load_device), str(offload_device))
    model = _LOADED.get(key)
    if model is not None:
        return model
    logger.info("Kosmos-G: opening %s (%s, load device %s, offload device %s)", path, dtype, load_device, offload_device)
    # built on the offload device; packed for faster encodes when it computes on the CPU
    pipeline = KosmosGPipeline.from_checkpoint(path, dtype=dtype, device=offload_device,
                                               pack_cpu_linears=packs_by_default(load_device, dtype), lazy=True)
    # moved to the load device only to compute: the caches (and the disk cache's entries) key by that device
    pipeline.compute_device = load_device
    # the weights' bytes in their dtype (packed ones are not parameters: counted here, before the load)
    model = KosmosGModel(pipeline=pipeline, name=name, cache_key=key, load_device=load_device,
                         offload_device=offload_device, weight_bytes=model_nbytes(pipeline.cfg, dtype))
    _LOADED[key] = model
    return model


def clear_cache() -> None:
    """Forget the loaded models (they are freed once nothing else holds them)."""
    _LOADED.clear()
