"""`generate` without --sd-model: the SD1.5 U-Net and VAE an official checkpoint stores (what the official demo
samples with), on tiny networks written into an official-format file under their official names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kosmosg_core.errors import CheckpointError
from kosmosg_core.generate import generate_images
from kosmosg_core.sd15 import load_sd15
from kosmosg_core.official_sd15 import load_official_sd15, missing_sd15_parts
from support.tiny_kosmosg import write_tiny_official, write_tiny_pack
from support.tiny_sd15 import store_sd15_networks, write_tiny_sd15

SAMPLING = dict(steps=2, height=16, width=16, seed=3)


def with_stored_sd15(pt: Path, sd_folder: str, parts=("unet", "vae")) -> None:
    """Store the tiny SD1.5 folder's U-Net and / or VAE in the official .pt, as the official model's submodules."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    store_sd15_networks(pt, UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet") if "unet" in parts else None,
                        AutoencoderKL.from_pretrained(sd_folder, subfolder="vae") if "vae" in parts else None)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    root = tmp_path_factory.mktemp("official-sd15")
    pt, tokenizer, _ = write_tiny_official(root / "official")
    sd_folder = write_tiny_sd15(root / "sd15")
    with_stored_sd15(pt, sd_folder)
    image = root / "subject.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(image)
    return pt, tokenizer, sd_folder, image


def test_the_stored_unet_and_vae_sample_what_the_same_networks_sample_from_a_folder(official, tmp_path):
    pt, tokenizer, sd_folder, image = official
    assert missing_sd15_parts(pt) == []
    common = dict(checkpoint=pt, prompt="a photo of <i>", images=[image], tokenizer_dir=tokenizer, **SAMPLING)
    (own,) = generate_images(sd_model=None, sd_config_dir=sd_folder, out_dir=tmp_path / "own", **common)
    (folder,) = generate_images(sd_model=sd_folder, out_dir=tmp_path / "folder", **common)
    assert np.array_equal(np.asarray(Image.open(own)), np.asarray(Image.open(folder)))  # the records name the models
    half = load_sd15(None, torch.bfloat16, torch.device("cpu"), "dpm", sd_folder, official_checkpoint=pt)
    assert half.unet.dtype == half.vae.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in [*half.unet.parameters(), *half.vae.parameters()])


def test_without_stored_networks_it_says_to_give_an_sd_model_before_loading(official, tmp_path, monkeypatch):
    pt, tokenizer, sd_folder, image = official
    import kosmosg_core.generate as generate

    monkeypatch.setattr(generate.KosmosGPipeline, "from_checkpoint", lambda *a, **k: pytest.fail("a model loaded"))
    pack, _, _ = write_tiny_pack(tmp_path / "pack")
    bare, bare_tokenizer, _ = write_tiny_official(tmp_path / "bare")
    vae_only, _, _ = write_tiny_official(tmp_path / "vae-only")
    with_stored_sd15(vae_only, sd_folder, parts=("vae",))
    for checkpoint, missing in ((pack, "U-Net or VAE"), (bare, "U-Net or VAE"), (vae_only, "U-Net")):
        with pytest.raises(CheckpointError, match=rf"stores no SD1.5 {missing} .*give an SD1.5 model \(--sd-model"):
            generate_images(checkpoint, None, "a photo", out_dir=tmp_path / "out", **SAMPLING)
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match=r"stores no SD1.5 U-Net \("):  # the API's own check, on the tensors read
        load_official_sd15(vae_only, torch.float32)
    with pytest.raises(CheckpointError, match=r"stores no SD1.5 U-Net or VAE \("):  # a converted file: neither
        load_official_sd15(pack, torch.float32)


def test_stored_networks_that_do_not_fit_the_config_are_refused_by_name(official, tmp_path):
    pt, tokenizer, _, image = official
    other = write_tiny_sd15(tmp_path / "other", context_dim=1024)  # cross-attention of another width
    with pytest.raises(CheckpointError, match=r"The SD1.5 U-Net stored in .* does not fit the config in .*other .*"
                                              r"give --sd-config with the configs it was made with"):
        generate_images(pt, None, "a photo of <i>", [image], tokenizer_dir=tokenizer, sd_config_dir=other,
                        out_dir=tmp_path / "out", **SAMPLING)
