"""TAESD-format autoencoder: the VAE that stock ComfyUI reads from inside an SD1.5 checkpoint.

Architecture and state-dict keys are those of ComfyUI's ``comfy/taesd/taesd.py`` (release 0.30.0,
``use_gn=False``, 4 latent channels): an 8x down-scaling encoder and up-scaling decoder, 64 channels
wide, made of 3x3 convs and residual ``Block``s. diffusers' ``AutoencoderTiny`` is the same network
under other names.

Formulas ComfyUI applies (``comfy.sd.VAE`` around ``TAESD``), with pixels ``p`` in [0, 1]:

    encode:  latent = taesd_encoder(p) / vae_scale + vae_shift
             (ComfyUI maps p to [-1, 1] first and TAESD.encode maps it back with x * 0.5 + 0.5)
    decode:  p = clamp(taesd_decoder((latent - vae_shift) * vae_scale), 0, 1)
             (the decoder starts with a soft clamp of its input, tanh(x / 3) * 3)
    U-Net:   the SD1.5 model sees latent * 0.18215 (``latent_formats.SD15``)

So choose ``vae_scale`` / ``vae_shift`` (scalars) with :func:`fit_latent_scale_shift` such that the
U-Net's input ``0.18215 * latent`` has zero mean and unit variance over the training images.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kosmosg_core.config import SD15_LATENT_SCALE

LATENT_CHANNELS = 4
WIDTH = 64


def conv(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the decoder input to +-3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """relu(conv(relu(conv(relu(conv(x))))) + x): x [B, 64, H, W] -> same shape."""

    def __init__(self, channels: int = WIDTH):
        super().__init__()
        self.conv = nn.Sequential(
            conv(channels, channels), nn.ReLU(), conv(channels, channels), nn.ReLU(), conv(channels, channels)
        )
        self.skip = nn.Identity()  # ComfyUI uses a 1x1 conv only when n_in != n_out (never here)
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class Encoder(nn.Sequential):
    """Pixels in [0, 1], [B, 3, H, W] -> raw latents [B, 4, H/8, W/8]."""

    def __init__(self, latent_channels: int = LATENT_CHANNELS):
        w = WIDTH
        super().__init__(
            conv(3, w), Block(w),
            conv(w, w, stride=2, bias=False), Block(w), Block(w), Block(w),
            conv(w, w, stride=2, bias=False), Block(w), Block(w), Block(w),
            conv(w, w, stride=2, bias=False), Block(w), Block(w), Block(w),
            conv(w, latent_channels),
        )


class Decoder(nn.Sequential):
    """Raw latents [B, 4, h, w] -> pixels (nominally [0, 1]) [B, 3, 8h, 8w]."""

    def __init__(self, latent_channels: int = LATENT_CHANNELS):
        w = WIDTH
        super().__init__(
            Clamp(), conv(latent_channels, w), nn.ReLU(),
            Block(w), Block(w), Block(w), nn.Upsample(scale_factor=2), conv(w, w, bias=False),
            Block(w), Block(w), Block(w), nn.Upsample(scale_factor=2), conv(w, w, bias=False),
            Block(w), Block(w), Block(w), nn.Upsample(scale_factor=2), conv(w, w, bias=False),
            Block(w), conv(w, 3),
        )


class TinyAutoencoder(nn.Module):
    """TAESD with ComfyUI's encode/decode formulas.

    State-dict keys: ``taesd_encoder.*``, ``taesd_decoder.*``, ``vae_scale``, ``vae_shift`` (the
    same as ComfyUI's ``TAESD``, i.e. the checkpoint keys without ``first_stage_model.``).
    ``vae_scale`` / ``vae_shift`` are buffers here: they are fitted, not trained.
    """

    def __init__(self, latent_channels: int = LATENT_CHANNELS):
        super().__init__()
        self.taesd_encoder = Encoder(latent_channels)
        self.taesd_decoder = Decoder(latent_channels)
        self.register_buffer("vae_scale", torch.tensor(1.0))
        self.register_buffer("vae_shift", torch.tensor(0.0))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] [B, 3, H, W] -> ComfyUI LATENT samples [B, 4, H/8, W/8] (TAESD.encode)."""
        return self.taesd_encoder(pixels * 0.5 + 0.5) / self.vae_scale + self.vae_shift

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """ComfyUI LATENT samples -> pixels in [-1, 1] (unclamped; TAESD.decode)."""
        return self.taesd_decoder((latents - self.vae_shift) * self.vae_scale) * 2 - 1

    def encode_to_unet_space(self, pixels01: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] [B, 3, H, W] -> what the SD1.5 U-Net sees (latent * 0.18215)."""
        return self.encode(pixels01 * 2 - 1) * SD15_LATENT_SCALE

    def decode_from_unet_space(self, unet_latents: torch.Tensor) -> torch.Tensor:
        """U-Net-space latents -> pixels in [0, 1], clamped as ComfyUI's VAEDecode does."""
        return ((self.decode(unet_latents / SD15_LATENT_SCALE) + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def set_scale_shift(self, scale: float, shift: float) -> None:
        if not scale > 0:
            raise ValueError(f"vae_scale must be > 0 (got {scale}); fit it with fit_latent_scale_shift")
        self.vae_scale.fill_(float(scale))
        self.vae_shift.fill_(float(shift))


def fit_latent_scale_shift(raw_latents: torch.Tensor) -> tuple[float, float]:
    """(vae_scale, vae_shift) making the U-Net input 0.18215 * (raw / scale + shift) zero-mean, unit-var.

    raw_latents: ``taesd_encoder`` outputs [N, 4, h, w] over (a sample of) the training images.
    """
    raw = raw_latents.detach().double()
    std = raw.std().item()
    if not std > 0:
        raise ValueError("raw_latents have zero variance; encode more (and varied) images before fitting")
    scale = SD15_LATENT_SCALE * std
    shift = -raw.mean().item() / scale
    return scale, shift
