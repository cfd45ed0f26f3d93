"""The SD1.5 U-Net and VAE an official Kosmos-G checkpoint stores, as a diffusers pipeline for `generate` (and, as
weights, for the ComfyUI node Kosmos-G SD1.5 From Checkpoint).

The official model holds SD1.5's U-Net and VAE as submodules (`diffusion_unet.unet.*`, `vae.vae.*`: diffusers
names), so fairseq's checkpoint keeps their weights, and the official demo loads them over the ones it downloads
(`load_state_dict(strict=False)`): generating with them is generating with what the demo runs. Conditioning never
reads them (checkpoint.OFFICIAL_KEYS_TO_IGNORE); `python -m kosmosg_core info` says whether a file has them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import check_checkpoint_path, file_format, official_tensor_names, state_dict_mismatch
from .config import SD15_CONFIG_DIR
from .errors import CheckpointError, first_line

UNET_PREFIX = "diffusion_unet.unet."
VAE_PREFIX = "vae.vae."
_PARTS = {"U-Net": UNET_PREFIX, "VAE": VAE_PREFIX}


def missing_sd15_parts(checkpoint) -> list[str]:
    """The parts ("U-Net", "VAE") an official `.pt` lacks (its tensor names only: no weight is read); a converted
    `.safetensors` holds what conditioning uses, so it lacks both."""
    return _missing_parts(official_tensor_names(checkpoint))


def _missing_parts(names) -> list[str]:
    return [part for part, prefix in _PARTS.items() if not any(name.startswith(prefix) for name in names)]


GIVE_AN_SD_MODEL = "give an SD1.5 model (--sd-model, a single file or a diffusers folder)"


def check_sd15_parts(checkpoint) -> None:
    """A CheckpointError unless `checkpoint` stores both an SD1.5 U-Net and a VAE, saying to give an SD1.5 model."""
    missing = missing_sd15_parts(checkpoint)
    if missing:
        raise _nothing_to_sample_with(checkpoint, missing, GIVE_AN_SD_MODEL)


def _nothing_to_sample_with(checkpoint, missing: list[str], fix: str) -> CheckpointError:
    return CheckpointError(f"{checkpoint} stores no SD1.5 {' or '.join(missing)} (`python -m kosmosg_core info` lists "
                           "what it holds; a converted .safetensors keeps only what conditioning uses), so there is "
                           f"nothing to sample with: {fix}.")


def read_official_sd15(checkpoint, fix: str = GIVE_AN_SD_MODEL, parts=tuple(_PARTS)) -> dict[str, dict]:
    """The SD1.5 U-Net and VAE an official `.pt` stores -> {"U-Net": weights, "VAE": weights} ({name: tensor}), each
    in diffusers' names (UNet2DConditionModel's, AutoencoderKL's); only the tensors of `parts` are read. A file
    lacking one (a converted .safetensors lacks both) is a CheckpointError ending in `fix` (what to do instead)."""
    from .safe_unpickle import load_pt_state_dict

    path = check_checkpoint_path(checkpoint)
    prefixes = tuple(_PARTS[part] for part in parts)
    stored = {} if file_format(path) == "safetensors" else load_pt_state_dict(  # a converted file has neither
        path, key="model", include=lambda key: key.startswith(prefixes))
    missing = [part for part in _missing_parts(stored) if part in parts]
    if missing:
        raise _nothing_to_sample_with(path, missing, fix)
    return {part: {key[len(_PARTS[part]):]: tensor for key, tensor in stored.items() if key.startswith(_PARTS[part])}
            for part in parts}


def load_official_sd15(checkpoint, dtype: torch.dtype, config_dir=None):
    """The U-Net and VAE stored in an official `.pt` -> a diffusers StableDiffusionPipeline without text encoder
    (scheduler from `config_dir` too; `sd15.load_sd15` replaces it with the official one). The networks are built
    from `config_dir` (default: SD1.5's own, kosmosg_core/sd15_config) and must fit it tensor for tensor."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    path, config_dir = check_checkpoint_path(checkpoint), Path(config_dir or SD15_CONFIG_DIR)
    stored = read_official_sd15(path)
    try:
        networks = {"U-Net": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet")),
                    "VAE": AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))}
        scheduler = PNDMScheduler.from_config(PNDMScheduler.load_config(config_dir / "scheduler"))
    except Exception as e:  # a damaged config: diffusers raises many kinds (OSError, ValueError, TypeError...)
        raise CheckpointError(f"Could not build SD1.5 from the configs in {config_dir} ({first_line(e)}); repair them, "
                              "or leave --sd-config out for SD1.5's own.") from e
    for part, network in networks.items():
        weights = stored[part]
        mismatch = state_dict_mismatch(network.state_dict(), weights)
        if mismatch:
            raise CheckpointError(f"The SD1.5 {part} stored in {path} does not fit the config in {config_dir} "
                                  f"({mismatch}); give --sd-config with the configs it was made with, or --sd-model.")
        # cast on loading, the network taking the tensors (assign=True): diffusers' own to(dtype) warns needlessly
        network.load_state_dict({key: tensor.to(dtype) for key, tensor in weights.items()}, strict=True, assign=True)
    return StableDiffusionPipeline(vae=networks["VAE"], text_encoder=None, tokenizer=None, unet=networks["U-Net"],
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _count_blocks(state_dict, pattern: str) -> int:
    """How many consecutive blocks 0, 1, ... `pattern` (a prefix with one {}) has keys in `state_dict`."""
    count = 0
    while any(key.startswith(pattern.format(count) + ".") for key in state_dict):
        count += 1
    return count


def unet_block_layout(state_dict) -> dict:
    """A diffusers UNet2DConditionModel's state dict -> its block layout as comfy.utils.unet_to_diffusers takes it
    (num_res_blocks, channel_mult, transformer_depth, transformer_depth_output, transformer_depth_middle), read
    from the tensors' names: how many resnets each down block has, how many transformer blocks each attention."""
    down = _count_blocks(state_dict, "down_blocks.{}")
    num_res_blocks = [_count_blocks(state_dict, f"down_blocks.{i}.resnets.{{}}") for i in range(down)]
    transformer_depth = [_count_blocks(state_dict, f"down_blocks.{i}.attentions.{j}.transformer_blocks.{{}}")
                         for i in range(down) for j in range(num_res_blocks[i])]
    up_depths = [_count_blocks(state_dict, f"up_blocks.{x}.attentions.{i}.transformer_blocks.{{}}")
                 for x in range(_count_blocks(state_dict, "up_blocks.{}"))
                 for i in range(_count_blocks(state_dict, f"up_blocks.{x}.resnets.{{}}"))]
    return {"num_res_blocks": num_res_blocks, "channel_mult": [1] * down,  # only its length is read
            "transformer_depth": transformer_depth,
            "transformer_depth_output": up_depths[::-1],  # unet_to_diffusers takes them from the end
            "transformer_depth_middle": _count_blocks(state_dict, "mid_block.attentions.0.transformer_blocks.{}")}
