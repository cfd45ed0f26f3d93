"""Tiny random SD1.5-format models for running real ComfyUI graphs on the CPU in seconds.

Run with the ComfyUI venv and the ComfyUI tree on sys.path (the harness does this):
    python tests/support/comfy_tiny_models.py --comfy <ComfyUI tree> --out <models dir>

Writes (keys exactly what ComfyUI's detectors expect, because ComfyUI's own classes build them):
    checkpoints/tiny-sd15.safetensors   U-Net (320 channels, one level: detected as SD15) + TAESD VAE,
                                        no CLIP text encoder (Kosmos-G supplies the conditioning;
                                        CheckpointLoaderSimple then returns clip=None)
    controlnet/tiny-cn-sd15.safetensors ControlNet with the same trunk
    loras/tiny-lora-sd15.safetensors    LoRA on a few cross-attention projections and, in SD1.5's CLIP text
                                        encoder, the first layer's attention projections (a LoRA with its own
                                        trigger words trains both)
    checkpoints/tiny-sd15-clip.safetensors  (with --with-clip) the same U-Net + VAE and a random SD1.5 CLIP text
                                        encoder, full size (ComfyUI builds SD1.5's CLIP-L from its own config:
                                        123 M parameters, 0.25 GB), for graphs with CLIP Text Encode
Generated at test time, never committed (ComfyUI is GPL; these are random weights anyway).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

UNET_NAME = "tiny-sd15.safetensors"
CLIP_CHECKPOINT_NAME = "tiny-sd15-clip.safetensors"
CONTROLNET_NAME = "tiny-cn-sd15.safetensors"
LORA_NAME = "tiny-lora-sd15.safetensors"
VERSION = "3"  # bump when the generated files change (cache key)

TRUNK = dict(
    image_size=32, in_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1], num_heads=8,
    use_spatial_transformer=True, transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1,
    context_dim=768, use_linear_in_transformer=False, legacy=False,
)
# (U-Net module path with dots, in features, out features): cross-attention projections the LoRA patches
LORA_TARGETS = [
    ("input_blocks.1.1.transformer_blocks.0.attn2.to_k", 768, 320),
    ("input_blocks.1.1.transformer_blocks.0.attn2.to_v", 768, 320),
    ("output_blocks.0.1.transformer_blocks.0.attn2.to_k", 768, 320),
]
# (LoRA key, in features, out features) in SD1.5's CLIP text encoder (ComfyUI's comfy/lora.py key map: kohya's names)
LORA_TEXT_ENCODER_TARGETS = [(f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj", 768, 768) for p in "qkv"]


def _init_(state, generator, conv_gain: float | None = None):
    """Write every tensor: ComfyUI's ops skip init, so a fresh module holds garbage (NaN images)."""
    import torch

    out = {}
    for name, tensor in state.items():
        shape = tuple(tensor.shape)
        if name.endswith("bias") or tensor.ndim == 0 and "shift" in name:
            value = torch.zeros(shape)
        elif tensor.ndim <= 1:
            value = torch.ones(shape)
        elif conv_gain is not None and tensor.ndim == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            bound = conv_gain * math.sqrt(3.0 / fan_in)
            value = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        else:
            value = torch.randn(shape, generator=generator) * 0.02
        out[name] = value.to(torch.float16)
    return out


def build(out_dir: str, seed: int = 0, with_clip: bool = False) -> dict[str, str]:
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported (CUDA build, no driver)
    import comfy.cldm.cldm
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    ops = comfy.ops.disable_weight_init
    with torch.device("meta"):
        unet = openaimodel.UNetModel(out_channels=4, operations=ops, **TRUNK)
        controlnet = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=ops, **TRUNK)
        taesd = comfy.taesd.taesd.TAESD()

    tensors = {f"model.diffusion_model.{k}": v for k, v in _init_(unet.state_dict(), generator).items()}
    vae = _init_(taesd.state_dict(), generator, conv_gain=1.0)
    vae["vae_scale"] = torch.tensor(1.0, dtype=torch.float16)
    vae["vae_shift"] = torch.tensor(0.0, dtype=torch.float16)
    tensors.update({f"first_stage_model.{k}": v for k, v in vae.items()})
    cn = {f"control_model.{k}": v for k, v in _init_(controlnet.state_dict(), generator).items()}
    lora = {}
    targets = [("lora_unet_" + module.replace(".", "_"), fan_in, fan_out) for module, fan_in, fan_out in LORA_TARGETS]
    for key, fan_in, fan_out in targets + LORA_TEXT_ENCODER_TARGETS:
        lora[f"{key}.lora_down.weight"] = (torch.randn(4, fan_in, generator=generator) * 0.1).to(torch.float16)
        lora[f"{key}.lora_up.weight"] = (torch.randn(fan_out, 4, generator=generator) * 0.1).to(torch.float16)
        lora[f"{key}.alpha"] = torch.tensor(4.0, dtype=torch.float16)

    files = [("checkpoints", UNET_NAME, tensors), ("controlnet", CONTROLNET_NAME, cn), ("loras", LORA_NAME, lora)]
    if with_clip:  # drawn last: the files above are the same with or without it
        with torch.device("meta"):
            clip = comfy.sd1_clip.SD1ClipModel(dtype=torch.float16, model_options={"custom_operations": ops})
        # the checkpoint names SD1.5's text encoder cond_stage_model.transformer.*; ComfyUI's class calls it clip_l.*
        clip_tensors = {f"cond_stage_model.{k.removeprefix('clip_l.')}": v
                        for k, v in _init_(clip.state_dict(), generator).items()}
        files.append(("checkpoints", CLIP_CHECKPOINT_NAME, {**tensors, **clip_tensors}))
    written = {}
    for sub, name, content in files:
        folder = os.path.join(out_dir, sub)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name)
        save_file({k: v.contiguous() for k, v in content.items()}, path + ".tmp")
        os.replace(path + ".tmp", path)
        written[name] = path
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfy", required=True, help="ComfyUI tree to import comfy.* from")
    parser.add_argument("--out", required=True, help="models directory to write checkpoints/, controlnet/, loras/ into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--with-clip", action="store_true", help=f"also write checkpoints/{CLIP_CHECKPOINT_NAME}")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.comfy))
    import torch

    torch.set_num_threads(1)
    for name, path in build(args.out, args.seed, args.with_clip).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
