"""Write / read the nano image model as a single-file SD1.5 checkpoint that stock ComfyUI loads.

Layout (``.safetensors``; what ``comfy.sd.load_checkpoint_guess_config`` reads):

    model.diffusion_model.<LDM U-Net key>      320-wide U-Net (NanoUNet.to_padded_state_dict())
    first_stage_model.taesd_encoder.<key>      TAESD encoder (train.nano.taesd)
    first_stage_model.taesd_decoder.<key>      TAESD decoder
    first_stage_model.vae_scale / vae_shift    scalars (see train.nano.taesd for the formulas)

No ``cond_stage_model.*``: the nano text encoder lives in its own folder, so ComfyUI's loader
returns no CLIP and conditioning comes from the Kosmos-G / nano text nodes.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file

from kosmosg_core.config import NANO_SD15_FORMAT, SD15_CONTEXT_DIM
from kosmosg_core.files import save_safetensors

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
ENCODER_PREFIX = VAE_PREFIX + "taesd_encoder."
DECODER_PREFIX = VAE_PREFIX + "taesd_decoder."
FORMAT_NAME = NANO_SD15_FORMAT
FORMAT_VERSION = "1"
SD15_MODEL_CHANNELS = 320


def _check_unet(sd: Mapping[str, torch.Tensor]) -> None:
    prefixed = [k for k in sd if k.startswith(UNET_PREFIX)]
    if prefixed:
        raise ValueError(f"unet_padded_sd keys must not carry '{UNET_PREFIX}' (e.g. {prefixed[0]}); pass "
                         f"NanoUNet.to_padded_state_dict()")
    first = sd.get("input_blocks.0.0.weight")
    if first is None or first.shape[0] != SD15_MODEL_CHANNELS:
        shape = None if first is None else list(first.shape)
        raise ValueError(f"unet_padded_sd: input_blocks.0.0.weight has shape {shape}; ComfyUI detects SD1.5 only at "
                         f"{SD15_MODEL_CHANNELS} channels - zero-pad the narrow U-Net with to_padded_state_dict()")
    context = [v for k, v in sd.items() if k.endswith("attn2.to_k.weight")]
    if not context or any(v.shape[1] != SD15_CONTEXT_DIM for v in context):
        raise ValueError(f"unet_padded_sd: cross-attention to_k must read a {SD15_CONTEXT_DIM}-wide context "
                         f"(found {[list(v.shape) for v in context][:2]})")


def _check_taesd(name: str, sd: Mapping[str, torch.Tensor], part: str, first_key: str) -> None:
    if first_key not in sd:
        raise ValueError(f"{name}: missing '{first_key}'; pass TinyAutoencoder().{part}.state_dict() "
                         f"(keys without the 'first_stage_model.{part}.' prefix)")


def write_sd15_checkpoint(
    path: str | os.PathLike,
    unet_padded_sd: Mapping[str, torch.Tensor],
    taesd_encoder_sd: Mapping[str, torch.Tensor],
    taesd_decoder_sd: Mapping[str, torch.Tensor],
    vae_scale: float,
    vae_shift: float,
    dtype: torch.dtype = torch.float16,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Writes the checkpoint atomically (temp file + rename) and returns its path.

    ``metadata`` entries (strings) are stored beside the format name / version, e.g. the
    ``NanoUNetConfig`` as JSON under ``"nano_unet_config"`` so a resume can rebuild the narrow net.
    """
    _check_unet(unet_padded_sd)
    _check_taesd("taesd_encoder_sd", taesd_encoder_sd, "taesd_encoder", "0.weight")
    _check_taesd("taesd_decoder_sd", taesd_decoder_sd, "taesd_decoder", "1.weight")
    if not float(vae_scale) > 0:
        raise ValueError(f"vae_scale must be > 0 (got {vae_scale})")

    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to("cpu")
        return (t.to(dtype) if t.is_floating_point() else t).contiguous()

    tensors: dict[str, torch.Tensor] = {}
    tensors.update({UNET_PREFIX + k: cast(v) for k, v in unet_padded_sd.items()})
    tensors.update({ENCODER_PREFIX + k: cast(v) for k, v in taesd_encoder_sd.items()})
    tensors.update({DECODER_PREFIX + k: cast(v) for k, v in taesd_decoder_sd.items()})
    tensors[VAE_PREFIX + "vae_scale"] = cast(torch.tensor(float(vae_scale)))
    tensors[VAE_PREFIX + "vae_shift"] = cast(torch.tensor(float(vae_shift)))

    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    for key, value in (metadata or {}).items():
        if not isinstance(value, str):
            raise ValueError(f"metadata[{key!r}] must be a string (safetensors metadata); use json.dumps")
        meta[key] = value
    path = save_safetensors(tensors, path, meta)
    logger.info("wrote %s (%.1f MB, %d tensors)", path, path.stat().st_size / 1e6, len(tensors))
    return path


def read_sd15_checkpoint(path: str | os.PathLike) -> dict:
    """Reads a checkpoint written by :func:`write_sd15_checkpoint` (safetensors only: no pickle).

    Returns ``{"unet": {...}, "taesd_encoder": {...}, "taesd_decoder": {...}, "vae_scale": float,
    "vae_shift": float, "metadata": {...}}`` with un-prefixed keys.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"SD1.5 checkpoint not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    tensors = load_file(str(path))
    out = {"unet": {}, "taesd_encoder": {}, "taesd_decoder": {}, "metadata": metadata}
    parts = ((UNET_PREFIX, "unet"), (ENCODER_PREFIX, "taesd_encoder"), (DECODER_PREFIX, "taesd_decoder"))
    for key, value in tensors.items():
        for prefix, part in parts:
            if key.startswith(prefix):
                out[part][key[len(prefix):]] = value
                break
    for name in ("vae_scale", "vae_shift"):
        if VAE_PREFIX + name not in tensors:
            raise ValueError(f"{path}: missing '{VAE_PREFIX}{name}'; not a nano SD1.5 checkpoint")
        out[name] = float(tensors[VAE_PREFIX + name])
    if not out["unet"]:
        raise ValueError(f"{path}: no '{UNET_PREFIX}*' tensors; not an SD1.5 checkpoint")
    if "nano_unet_config" in metadata:
        out["nano_unet_config"] = json.loads(metadata["nano_unet_config"])
    return out


def load_networks(path: str | os.PathLike, name: str | None = None):
    """(NanoUNet, TinyAutoencoder) of a checkpoint written by :func:`write_sd15_checkpoint` (with the
    ``nano_unet_config`` metadata, as export_nano writes it): float32, eval mode. ``name``: how errors call it."""
    from train.nano.taesd import TinyAutoencoder
    from train.nano.unet import NanoUNet, NanoUNetConfig

    saved = read_sd15_checkpoint(path)
    if "nano_unet_config" not in saved:
        raise ValueError(f"{name or path}: no 'nano_unet_config' metadata, so the narrow U-Net cannot be rebuilt; "
                         "export it with python -m train.nano.export_nano (or write_sd15_checkpoint(metadata=...)).")
    unet = NanoUNet.from_padded_state_dict({k: v.float() for k, v in saved["unet"].items()},
                                           NanoUNetConfig.from_dict(saved["nano_unet_config"]))
    autoencoder = TinyAutoencoder()
    autoencoder.taesd_encoder.load_state_dict({k: v.float() for k, v in saved["taesd_encoder"].items()})
    autoencoder.taesd_decoder.load_state_dict({k: v.float() for k, v in saved["taesd_decoder"].items()})
    autoencoder.set_scale_shift(saved["vae_scale"], saved["vae_shift"])
    return unet.eval(), autoencoder.eval()
