"""A tiny SD1.5-shaped diffusers pipeline folder (unet/, vae/, scheduler/, model_index.json; no text
encoder: Kosmos-G supplies the conditioning). Loadable by `StableDiffusionPipeline.from_pretrained`,
`kosmosg_core.sd15.load_sd15` and train/'s score-model interface."""

from __future__ import annotations

from pathlib import Path

import torch


def write_tiny_sd15(root, context_dim: int = 768, seed: int = 0) -> str:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    root = Path(root)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=context_dim,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=16)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)  # as SD1.5's
    StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(str(root))
    return str(root)


def comfy_detectable_sd15_networks(seed: int = 0):
    """(U-Net, VAE) in diffusers' classes, random, float32: a U-Net ComfyUI detects as SD1.5 (320 channels, 768-wide
    context) but small (two levels, one resnet each, the cross-attention on the first level down and the last up, as
    SD1.5's are), and SD1.5's own VAE (ComfyUI builds SD VAEs at their one size)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from kosmosg_core.config import SD15_CONFIG_DIR

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, layers_per_block=1, block_out_channels=(320, 320),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                                attention_head_dim=8)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG_DIR / "vae"))
    return unet.eval(), vae.eval()


def store_sd15_networks(pt, unet=None, vae=None, dtype: torch.dtype | None = None, out=None) -> None:
    """Store a U-Net and / or VAE (diffusers modules) in the official-format checkpoint `pt` under the official
    model's names (`diffusion_unet.unet.*`, `vae.vae.*`), in `dtype` (default: as they are); written to `out`
    (default: over `pt`)."""
    state = torch.load(pt, weights_only=True)  # the tests' own fixture
    for prefix, network in (("diffusion_unet.unet.", unet), ("vae.vae.", vae)):
        if network is not None:
            state["model"].update({prefix + k: v if dtype is None else v.to(dtype)
                                   for k, v in network.state_dict().items()})
    torch.save(state, out or pt)
