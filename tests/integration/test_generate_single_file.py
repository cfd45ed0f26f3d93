"""`generate` from an SD1.5 single-file checkpoint (LDM key layout) equals generating from the same
weights as a diffusers folder. The single file is written with ComfyUI's own diffusers->LDM key maps."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from support.comfy_modules import import_comfy
from support.tiny_kosmosg import write_tiny_pack
from support.tiny_sd15 import write_tiny_sd15

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def write_single_file(folder: Path, path: Path) -> None:
    comfy = import_comfy()
    import comfy.diffusers_convert
    import comfy.utils
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").state_dict()
    # the tiny U-Net's LDM description (2 levels, 1 res-block each, attention on the first level only)
    ldm = {"num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 0],
           "transformer_depth_output": [1, 1, 0, 0], "transformer_depth_middle": 1}
    tensors = {"model.diffusion_model." + ldm_key: unet[key] for key, ldm_key in comfy.utils.unet_to_diffusers(ldm).items()
               if key in unet}
    assert len(tensors) == len(unet)
    for key, value in comfy.diffusers_convert.convert_vae_state_dict(vae).items():
        # ComfyUI's VAE map assumes SD's 4 levels (up block i -> up.{3-i}); the tiny VAE has 2
        key = re.sub(r"^decoder\.up\.([23])\.", lambda m: f"decoder.up.{int(m.group(1)) - 2}.", key)
        tensors["first_stage_model." + key] = value
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def test_single_file_generates_the_same_image_as_the_folder(tmp_path):
    folder = Path(write_tiny_sd15(tmp_path / "tiny-sd15"))
    single = tmp_path / "tiny-sd15.safetensors"
    write_single_file(folder, single)
    checkpoint = write_tiny_pack(tmp_path / "kosmosg")[0]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    outputs = {}
    for name, extra in (("folder", ["--sd-model", folder]), ("single", ["--sd-model", single, "--sd-config", folder])):
        subprocess.run([sys.executable, "-m", "kosmosg_core", "generate", "--checkpoint", checkpoint,
                        "--prompt", "a red apple", "--steps", "3", "--height", "32", "--width", "32", "--seed", "3",
                        "--out-dir", tmp_path / name, *map(str, extra)], check=True, env=env, cwd=REPO,
                       capture_output=True, timeout=300)
        outputs[name] = np.asarray(Image.open(tmp_path / name / "kosmosg_3_0.png"))
    assert outputs["folder"].shape == (32, 32, 3)
    assert np.array_equal(outputs["folder"], outputs["single"])
    assert torch.tensor(outputs["folder"]).float().std() > 0
