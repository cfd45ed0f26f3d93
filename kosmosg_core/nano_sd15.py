"""The pack's nano image model (`models/nano/nano-sd15.safetensors`) as a diffusers SD1.5 pipeline.

The file is what stock ComfyUI loads as an SD1.5 checkpoint (metadata format `NANO_SD15_FORMAT`, written
by train/nano/sd15_format.py):

    model.diffusion_model.<LDM key>          a 1-level, 320-wide SD1.5 U-Net (1 res-block, 1 transformer)
    first_stage_model.taesd_encoder.<N>.*    a TAESD autoencoder (ComfyUI's key names)
    first_stage_model.taesd_decoder.<N>.*
    first_stage_model.vae_scale / vae_shift  scalars of ComfyUI's TAESD formulas

diffusers has both networks: `UNet2DConditionModel` with one block level, and `AutoencoderTiny` (TAESD
under other names). This module maps the keys and ComfyUI's formulas onto them, so `generate` samples the
nano model through the same StableDiffusionPipeline as any SD1.5 model. Only safetensors is read (no pickle).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from .config import NANO_IMAGE_SIZE, SD15_CONFIG_DIR, SD15_LATENT_SCALE

UNET_PREFIX = "model.diffusion_model."
TAESD_ENCODER_PREFIX = "first_stage_model.taesd_encoder."
TAESD_DECODER_PREFIX = "first_stage_model.taesd_decoder."
VAE_SCALE_KEY, VAE_SHIFT_KEY = "first_stage_model.vae_scale", "first_stage_model.vae_shift"
VAE_DOWNSCALE = 8  # TAESD, like SD1.5's VAE: 8 pixels per latent

# SD1.5's U-Net config (kosmosg_core/sd15_config) with the nano model's depth: one level, 320 wide.
NANO_UNET_CHANGES = dict(block_out_channels=[320], down_block_types=["CrossAttnDownBlock2D"],
                         up_block_types=["CrossAttnUpBlock2D"], layers_per_block=1,
                         sample_size=NANO_IMAGE_SIZE // VAE_DOWNSCALE)  # the size it was trained at


def nano_unet_config() -> dict:
    config = json.loads((SD15_CONFIG_DIR / "unet" / "config.json").read_text())
    return {**config, **NANO_UNET_CHANGES}


@functools.cache  # one class, however many pipelines are loaded
def comfy_taesd_class():
    """`ComfyTAESD` (built on first use: diffusers is imported only where generation needs it)."""
    from diffusers import AutoencoderTiny
    from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput

    class ComfyTAESD(AutoencoderTiny):
        """AutoencoderTiny with ComfyUI's TAESD formulas (comfy/taesd/taesd.py):

            encode: latent = taesd_encoder(pixels01) / vae_scale + vae_shift
            decode: pixels01 = taesd_decoder((latent - vae_shift) * vae_scale)

        SD pipelines scale by `scaling_factor` only (U-Net latents = latent * 0.18215). With
        scaling_factor = 0.18215 / vae_scale and shift_factor = vae_shift * vae_scale, the networks see
        U-Net latents / scaling_factor - shift_factor, which is ComfyUI's formula; diffusers' SD1.5 pipeline
        ignores `shift_factor`, so it is applied here.
        """

        def encode(self, x: torch.Tensor, return_dict: bool = True):
            latents = super().encode(x, return_dict=False)[0] + self.config.shift_factor
            return AutoencoderTinyOutput(latents=latents) if return_dict else (latents,)

        def decode(self, x: torch.Tensor, generator=None, return_dict: bool = True):
            return super().decode(x - self.config.shift_factor, generator=generator, return_dict=return_dict)

    return ComfyTAESD


def load_nano_sd15(path: Path, dtype: torch.dtype):
    """A StableDiffusionPipeline (no text encoder; SD1.5's PNDM scheduler settings) holding the nano U-Net and
    TAESD of `path`. Raises KeyError / RuntimeError / ValueError for a damaged file (the caller names it)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from safetensors.torch import load_file

    # Cast on loading, the modules taking the loaded tensors (assign=True): diffusers' own to(dtype) warns needlessly
    stored = load_file(str(path))
    vae_scale, vae_shift = float(stored[VAE_SCALE_KEY]), float(stored[VAE_SHIFT_KEY])  # as stored (fp16 -> float)
    tensors = {key: value.to(dtype) for key, value in stored.items()}
    unet = UNet2DConditionModel.from_config(nano_unet_config())
    unet_ldm = {key: value for key, value in tensors.items() if key.startswith(UNET_PREFIX)}
    unet.load_state_dict(convert_ldm_unet_checkpoint(unet_ldm, unet.config), strict=True, assign=True)

    if not vae_scale > 0:
        raise ValueError(f"{VAE_SCALE_KEY} is {vae_scale}, not a positive number")
    vae = comfy_taesd_class()(scaling_factor=SD15_LATENT_SCALE / vae_scale, shift_factor=vae_shift * vae_scale)
    vae.load_state_dict(taesd_to_diffusers(tensors), strict=True, assign=True)

    scheduler = PNDMScheduler.from_pretrained(str(SD15_CONFIG_DIR), subfolder="scheduler")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    return pipe


def taesd_to_diffusers(tensors: dict) -> dict:
    """ComfyUI's TAESD keys -> AutoencoderTiny's. The encoders' layers line up one to one; ComfyUI's decoder
    starts with its soft clamp as layer 0, which AutoencoderTiny's decoder applies in forward()."""
    mapped = {}
    for key, value in tensors.items():
        if key.startswith(TAESD_ENCODER_PREFIX):
            mapped["encoder.layers." + key[len(TAESD_ENCODER_PREFIX):]] = value
        elif key.startswith(TAESD_DECODER_PREFIX):
            index, rest = key[len(TAESD_DECODER_PREFIX):].split(".", 1)
            mapped[f"decoder.layers.{int(index) - 1}.{rest}"] = value
    return mapped
