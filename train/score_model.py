"""The frozen score model of stage 3 behind one interface: U-Net + autoencoder + DDPM noise schedule.

Two sources give the same three operations (decisions.md "train/"):
- a diffusers SD1.5 model: a folder with `unet/`, `vae/` (and optionally `scheduler/`) as written
  by `save_pretrained`, or an SD1.5 single-file checkpoint (`.safetensors` / `.ckpt`) read with the
  bundled SD1.5 configs in `kosmosg_core/sd15_config` (no hub access);
- the nano model: the single-file checkpoint written by `train.nano.sd15_format`
  (`format = kosmosg-nano-sd15`), run as the narrow `NanoUNet` (mathematically the 320-wide one)
  with its TAESD autoencoder.

Latents are always in the space the U-Net sees (`vae latent * scaling factor`), pixels in [-1, 1].
Glossary: B batch, H/W image size, h/w latent size (H/8), T context tokens, C context width.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from kosmosg_core.config import NANO_SD15_FORMAT, SD15_CONFIG_DIR
from kosmosg_core.files import safetensors_format
from train.nano.taesd import LATENT_CHANNELS

logger = logging.getLogger(__name__)


def sd15_noise_scheduler(folder: Path | None = None):
    """DDPMScheduler with SD1.5's schedule (1000 steps, scaled-linear betas 0.00085 -> 0.012, epsilon)."""
    from diffusers import DDPMScheduler

    if folder is not None and (folder / "scheduler" / "scheduler_config.json").is_file():
        return DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler")
    return DDPMScheduler.from_pretrained(str(SD15_CONFIG_DIR), subfolder="scheduler")


class ScoreModel:
    """Frozen eps-prediction model: `encode_latents`, `add_noise`, `predict_noise`, `scheduler`.

    Not an `nn.Module` on purpose: it is never trained and never wrapped by DDP/FSDP; `.to()`
    moves and casts its networks.
    """

    def __init__(self, unet: nn.Module, autoencoder: nn.Module, scheduler, kind: str, context_dim: int,
                 latent_scale: float = 1.0):
        self.unet = unet.eval().requires_grad_(False)
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.kind = kind  # "diffusers" or "nano"
        self.context_dim = context_dim
        self.latent_scale = latent_scale
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError(f"Score model scheduler predicts {scheduler.config.prediction_type!r}; Kosmos-G stage 3 "
                             "trains SD1.5's epsilon prediction. Use an SD1.5 (epsilon) model.")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "ScoreModel":
        cast = dtype is not None and dtype != self.dtype  # diffusers warns on no-op float32 casts
        for net in (self.unet, self.autoencoder):
            net.to(device)
            if cast:
                net.to(dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """[C, h, w] of the latents of a [3, resolution, resolution] image (what `encode_latents` gives)."""
        if self.kind == "nano":
            channels, factor = LATENT_CHANNELS, 8  # TAESD: three stride-2 convolutions
        else:
            config = self.autoencoder.config
            channels, factor = config.latent_channels, 2 ** (len(config.block_out_channels) - 1)
        return channels, resolution // factor, resolution // factor

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor, latent_noise: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> U-Net-space latents [B, 4, h, w].

        For the diffusers VAE the latent is sampled (official: `latent_dist.sample() * 0.18215`)
        as mean + std * `latent_noise`; pass `latent_noise` [B, 4, h, w] from a seeded generator
        for reproducibility, or None for the mean. TAESD is deterministic and ignores it."""
        images = images.to(device=self._device, dtype=self.dtype)
        if self.kind == "nano":
            return self.autoencoder.encode_to_unet_space(images * 0.5 + 0.5)
        dist = self.autoencoder.encode(images).latent_dist
        latents = dist.mean if latent_noise is None else dist.mean + dist.std * latent_noise.to(dist.mean)
        return latents * self.latent_scale

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) of the DDPM schedule: [B, 4, h, w] -> [B, 4, h, w]."""
        return self.scheduler.add_noise(latents, noise.to(latents), timesteps.to(latents.device))

    def predict_noise(self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """eps = U-Net(x_t [B, 4, h, w], t [B], context [B, T, C]). Gradients flow into `context` only."""
        context = context.to(self.dtype)
        noisy = noisy.to(self.dtype)
        if self.kind == "nano":
            return self.unet(noisy, timesteps, context)
        return self.unet(noisy, timesteps, encoder_hidden_states=context).sample

    @property
    def _device(self):
        return next(self.unet.parameters()).device

    def enable_gradient_checkpointing(self) -> None:
        """Recompute U-Net activations in backward (official --checkpoint-activations); diffusers only."""
        if hasattr(self.unet, "enable_gradient_checkpointing"):
            self.unet.enable_gradient_checkpointing()
            self.unet.train()  # diffusers checkpoints only in training mode; the U-Net has no dropout
        else:
            logger.info("gradient checkpointing: the %s U-Net does not support it; ignored", self.kind)


# --- loading -----------------------------------------------------------------------------------------
def load_score_model(path, kind: str = "auto") -> ScoreModel:
    """A diffusers SD1.5 folder / single file, or a nano SD1.5 single file -> ScoreModel (float32, CPU).

    kind: "auto" (decided from the files), "diffusers" or "nano"."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"score model {path} not found: give a diffusers SD1.5 folder (unet/, vae/), an SD1.5 "
                         "single-file checkpoint, or a nano SD1.5 .safetensors (train.nano).")
    if kind not in ("auto", "diffusers", "nano"):
        raise ValueError(f"score_model_kind={kind!r}: use auto, diffusers or nano.")
    if kind == "auto":
        kind = "nano" if path.is_file() and safetensors_format(path) == NANO_SD15_FORMAT else "diffusers"
    if kind == "nano":
        return _load_nano(path)
    if path.is_dir():
        return _load_diffusers_folder(path)
    return _load_diffusers_single_file(path)


def _load_diffusers_folder(folder: Path) -> ScoreModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    for sub in ("unet", "vae"):
        if not (folder / sub / "config.json").is_file():
            raise ValueError(f"score model folder {folder} has no {sub}/config.json; give a diffusers SD1.5 folder "
                             "(save_pretrained layout with unet/ and vae/).")
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae")
    return ScoreModel(unet, vae, sd15_noise_scheduler(folder), "diffusers",
                      context_dim=int(unet.config.cross_attention_dim),
                      latent_scale=float(vae.config.scaling_factor))


def _load_diffusers_single_file(path: Path) -> ScoreModel:
    """An SD1.5 single file (ComfyUI / A1111 layout) with the bundled configs; nothing is downloaded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_single_file(str(path), config=str(SD15_CONFIG_DIR), subfolder="unet",
                                                     local_files_only=True)
        vae = AutoencoderKL.from_single_file(str(path), config=str(SD15_CONFIG_DIR), subfolder="vae",
                                             local_files_only=True)
    except Exception as e:  # noqa: BLE001 - diffusers raises many types for foreign files
        raise ValueError(f"score model {path} could not be read as an SD1.5 single-file checkpoint ({e}). Give a "
                         "diffusers folder (unet/, vae/) or an SD1.5 .safetensors.") from e
    return ScoreModel(unet, vae, sd15_noise_scheduler(None), "diffusers",
                      context_dim=int(unet.config.cross_attention_dim),
                      latent_scale=float(vae.config.scaling_factor))


def _load_nano(path: Path) -> ScoreModel:
    from train.nano.sd15_format import load_networks

    unet, autoencoder = load_networks(path, f"nano score model {path}")
    cfg = unet.config
    logger.info("nano score model %s: %s", path, json.dumps(cfg.to_dict(), sort_keys=True))
    return ScoreModel(unet, autoencoder, sd15_noise_scheduler(None), "nano", context_dim=cfg.context_dim)
