"""`generate` on the shipped nano image model (models/nano/nano-sd15.safetensors, kosmosg_core/nano_sd15.py):
diffusers' U-Net and AutoencoderTiny built from the file compute what train/nano's networks and ComfyUI
compute, and the headless CLI samples the shipped models into judged-right pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from kosmosg_core.config import SD15_LATENT_SCALE
from kosmosg_core.errors import CheckpointError, MissingPackageError
from kosmosg_core.generate import generate_images
from kosmosg_core.sd15 import load_sd15, native_size
from kosmosg_core.nano_sd15 import VAE_SHIFT_KEY, load_nano_sd15
from support import nano_ootb
from support.comfy_modules import import_comfy

REPO = Path(__file__).resolve().parents[1]
NANO_SD15 = REPO / "models" / "nano" / "nano-sd15.safetensors"
KOSMOSG_NANO = REPO / "models" / "nano" / "kosmosg-nano.safetensors"
SUBJECT_IMAGES = [REPO / "workflows" / "input" / subject.file for subject in nano_ootb.SUBJECTS]


@pytest.fixture(scope="module")
def pipe():
    return load_sd15(NANO_SD15, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def train_nano_models():
    """The shipped file through train/nano's own networks (each tested equal to ComfyUI's in test_nano_*)."""
    from train.nano.sd15_format import load_networks

    return load_networks(NANO_SD15)


def unet_inputs(seed: int = 0):
    """x [2, 4, 8, 8] U-Net-space latents, timesteps [2], context [2, 77, 768]."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([15, 800]),
            torch.randn(2, 77, 768, generator=generator))


def test_diffusers_unet_equals_the_narrow_nano_unet(pipe, train_nano_models):
    x, t, context = unet_inputs()
    with torch.no_grad():
        expected = train_nano_models[0](x, t, context)
        got = pipe.unet(x, t, encoder_hidden_states=context).sample
    assert expected.abs().mean() > 0.1  # a real signal
    assert (got - expected).abs().max() <= 1e-5


def test_vae_applies_comfyui_taesd_scale_and_shift(pipe, train_nano_models):
    """The pipeline decodes `latents / scaling_factor` and encodes to `latents * scaling_factor`: with those, the
    pixels and latents are ComfyUI's (train.nano.taesd's formulas), shift included."""
    vae = train_nano_models[1]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))  # U-Net space
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))  # [0, 1]
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample  # [-1, 1]
        assert torch.allclose(((decoded + 1) / 2).clamp(0, 1), vae.decode_from_unet_space(latents), atol=1e-5)
        encoded = pipe.vae.encode(pixels * 2 - 1).latents * pipe.vae.config.scaling_factor
        assert torch.allclose(encoded, vae.encode_to_unet_space(pixels), atol=1e-5)
        # without the shift (diffusers' AutoencoderTiny as it is) the pictures would differ
        unshifted = type(pipe.vae).__mro__[1].decode(pipe.vae, latents / pipe.vae.config.scaling_factor).sample
        assert (unshifted - decoded).abs().max() > 0.05
    assert pipe.vae.config.shift_factor != 0 and native_size(pipe) == nano_ootb.IMAGE_PX


def test_bfloat16_loads_every_weight_in_bfloat16():
    pipe = load_nano_sd15(NANO_SD15, torch.bfloat16)
    dtypes = {p.dtype for module in (pipe.unet, pipe.vae) for p in [*module.parameters(), *module.buffers()]}
    assert dtypes == {torch.bfloat16}


def test_damaged_nano_file_names_itself_and_the_fix(tmp_path):
    damaged = tmp_path / "nano-sd15.safetensors"
    tensors = load_file(str(NANO_SD15))
    del tensors[VAE_SHIFT_KEY]
    save_file(tensors, str(damaged), metadata={"format": "kosmosg-nano-sd15", "format_version": "1"})
    with pytest.raises(CheckpointError, match=r"as the pack's nano image model \(.*vae_shift.*git checkout models/nano"):
        load_sd15(damaged, torch.float32, torch.device("cpu"))
    tensors = load_file(str(NANO_SD15))
    tensors = {k: (v[:160] if k.endswith("input_blocks.0.0.weight") else v) for k, v in tensors.items()}  # half wide
    save_file(tensors, str(damaged), metadata={"format": "kosmosg-nano-sd15", "format_version": "1"})
    with pytest.raises(CheckpointError, match="damaged; restore it"):
        load_sd15(damaged, torch.float32, torch.device("cpu"))


def test_generate_samples_the_shipped_models_into_judged_right_pictures(tmp_path):
    """The out-of-the-box request, headless, with generate's defaults (the official DPM-Solver, 50 steps, guidance 6;
    the model's own 64 px): every picture shows the red circle left and the blue square right, on grey (the README
    gives how often, over 32 seeds)."""
    paths = generate_images(KOSMOSG_NANO, NANO_SD15, nano_ootb.PROMPT, SUBJECT_IMAGES, out_dir=tmp_path, num_images=3)
    pictures = [np.asarray(Image.open(path)) for path in paths]
    assert [picture.shape for picture in pictures] == [(64, 64, 3)] * 3
    assert all(nano_ootb.judge_output(picture)["right"] for picture in pictures)
    assert not np.array_equal(pictures[0], pictures[1])  # seeds 0 and 1


def png_record(path) -> dict:
    import json

    from kosmosg_core.config import PNG_SETTINGS_KEY

    return json.loads(Image.open(path).text[PNG_SETTINGS_KEY])


def test_each_png_records_the_settings_that_make_it_again(tmp_path):
    """The PNG's text chunk `kosmosg` (JSON) holds what the picture was made from, images by file name; passing the
    record's arguments back (the images found by name) gives the same pixels."""
    import hashlib

    from kosmosg_core import __version__
    from kosmosg_core.files import content_fingerprint
    from kosmosg_core.image_processing import to_pil_images

    prompt = "a <i:0.9> on the left and a <i> on the right, on grey – 灰"
    paths = generate_images(KOSMOSG_NANO, NANO_SD15, prompt, SUBJECT_IMAGES, out_dir=tmp_path / "first", steps=4,
                            guidance_scale=4.0, seed=11, num_images=2, image_weights=[1.0, 0.5], width=72,
                            negative_prompt="a black background")
    records = [png_record(path) for path in paths]
    first = records[1]
    assert first == {
        "prompt": prompt, "negative_prompt": "a black background", "images": [p.name for p in SUBJECT_IMAGES],
        "image_sha256": [hashlib.sha256(picture.tobytes()).hexdigest() for picture in to_pil_images(SUBJECT_IMAGES)],
        "image_sizes": [list(picture.size) for picture in to_pil_images(SUBJECT_IMAGES)],
        "image_weights": [1.0, 0.5], "effective_image_weights": [0.9, 0.5], "checkpoint": KOSMOSG_NANO.name,
        "sd_model": NANO_SD15.name, "seed": 11, "noise": "per-image", "num_images": 2, "steps": 4,
        "guidance_scale": 4.0, "scheduler": "dpm", "dtype": "float32", "device": "cpu",
        "kosmosg_core_version": __version__, "image_index": 1, "width": 72, "height": 64,
        "requested_width": 72, "requested_height": None,
        "checkpoint_fingerprint": content_fingerprint(KOSMOSG_NANO), "sd_model_fingerprint": content_fingerprint(NANO_SD15),
        "sd_config": None, "sd_config_fingerprint": None}
    assert records[0]["image_index"] == 0
    arguments = ("prompt", "negative_prompt", "image_weights", "seed", "noise", "num_images", "steps",
                 "guidance_scale", "scheduler", "width", "height")
    again = generate_images(KOSMOSG_NANO, NANO_SD15, images=[SUBJECT_IMAGES[0].parent / n for n in first["images"]],
                            out_dir=tmp_path / "again", **{name: first[name] for name in arguments})
    for original, remade in zip(paths, again):
        assert np.array_equal(np.asarray(Image.open(original)), np.asarray(Image.open(remade)))


@pytest.mark.parametrize("noise", ["per-image", "official"])
def test_generate_like_a_png_makes_it_again(tmp_path, noise, caplog):
    """`generate --like PNG` with the files given again remakes the picture from its record alone, without a
    warning: per-image noise, that one picture (its own seed); official noise (one draw for all), the whole run,
    the picture among them."""
    import logging

    from kosmosg_core.cli import main

    prompt = "a <i:0.9> on the left and a <i> on the right, on grey"
    made = generate_images(KOSMOSG_NANO, NANO_SD15, prompt, SUBJECT_IMAGES, out_dir=tmp_path / "first", steps=3,
                           guidance_scale=4.0, seed=5, num_images=3, image_weights=[1.0, 0.5], noise=noise,
                           negative_prompt="a black background")
    files = ["--checkpoint", KOSMOSG_NANO, "--sd-model", NANO_SD15, *(a for i in SUBJECT_IMAGES for a in ("--image", i))]
    # per-image noise: each picture of the batch alone (it was sampled alone too: a batch's matmuls round
    # differently, a few pixels 1 apart); official noise: the whole run, the picture among them
    for index in (range(3) if noise == "per-image" else [1]):
        out_dir = tmp_path / f"again{index}"
        with caplog.at_level(logging.WARNING):
            assert main(["generate", "--like", str(made[index]), *map(str, files), "--out-dir", str(out_dir)]) == 0
        assert [r for r in caplog.records if r.name.startswith("kosmosg_core")] == []
        again = sorted(out_dir.glob("*.png"))
        assert len(again) == (1 if noise == "per-image" else 3)
        remade = again[0] if noise == "per-image" else again[index]
        assert np.array_equal(np.asarray(Image.open(remade)), np.asarray(Image.open(made[index]))), index
    if noise == "per-image":  # a flag overrides the record: another seed, another picture
        assert main(["generate", "--like", str(made[1]), *map(str, files), "--seed", "99",
                     "--out-dir", str(tmp_path / "other")]) == 0
        (other,) = (tmp_path / "other").glob("*.png")
        assert not np.array_equal(np.asarray(Image.open(other)), np.asarray(Image.open(made[1])))
        assert png_record(other)["seed"] == 99 and png_record(other)["steps"] == 3


def test_the_record_takes_every_input_generate_takes_and_can_be_left_out(tmp_path):
    """Weights given as one number or an empty list, a file name that is not UTF-8, a batch inside the image list:
    recorded (one entry per image) before anything loads, as they were sampled; record_settings=False: no record."""
    import os
    import shutil

    odd_name = tmp_path / os.fsdecode(b"caf\xe9.png")  # a Linux file name in no encoding
    shutil.copy(SUBJECT_IMAGES[0], odd_name)
    fast = dict(steps=2, out_dir=tmp_path / "out")
    (one,) = generate_images(KOSMOSG_NANO, NANO_SD15, "a <i> on grey", [odd_name], image_weights=0.5, **fast)
    assert png_record(one)["images"] == [odd_name.name] and png_record(one)["image_weights"] == [0.5]
    (empty,) = generate_images(KOSMOSG_NANO, NANO_SD15, "a <i> on grey", str(SUBJECT_IMAGES[0]), image_weights=[],
                               **fast)
    assert png_record(empty)["images"] == [SUBJECT_IMAGES[0].name] and png_record(empty)["image_weights"] == [1.0]
    batch = torch.from_numpy(np.stack([np.asarray(Image.open(p)) for p in SUBJECT_IMAGES])).float() / 255
    (pair,) = generate_images(KOSMOSG_NANO, NANO_SD15, "a <i> and a <i>", [batch], **fast)
    record = png_record(pair)
    assert record["images"] == [None, None] and len(record["image_sha256"]) == len(record["image_weights"]) == 2
    (bare,) = generate_images(KOSMOSG_NANO, NANO_SD15, "a <i> on grey", [odd_name], record_settings=False, **fast)
    assert Image.open(bare).text == {}


@pytest.mark.integration
def test_pipeline_computes_what_comfyui_computes_from_the_file(pipe):
    """ComfyUI's own loader (CheckpointLoaderSimple's function) on the shipped file: its U-Net and VAE give
    the diffusers pipeline's outputs."""
    comfy = import_comfy()
    import comfy.sd

    model, _clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(str(NANO_SD15), output_vae=True, output_clip=False)
    x, t, context = unet_inputs(seed=3)
    with torch.no_grad():
        expected = model.model.diffusion_model(x, timesteps=t, context=context, transformer_options={}).float()
        assert (pipe.unet(x, t, encoder_hidden_states=context).sample - expected).abs().max() <= 1e-4
        comfy_pixels = vae.decode(x / SD15_LATENT_SCALE).float()  # IMAGE [B, 64, 64, 3] in [0, 1]
        decoded = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
        ours = ((decoded + 1) / 2).clamp(0, 1).movedim(1, -1)
    assert (ours - comfy_pixels).abs().max() <= 1e-3


def test_sampling_far_from_the_models_own_size_warns_once(pipe, caplog):
    """Asked for SD1.5's 512 px (train.eval's benchmarks used to default to it), the nano model gives no usable picture.
    Warned once per model and size (train.eval samples batch after batch), for either side."""
    from kosmosg_core.generate import image_generators, sample_sd15

    cond = torch.zeros(1, 77, 768)

    def sample(height, width):
        sample_sd15(pipe, "nano", cond, cond, image_generators(0, 1), steps=1, guidance_scale=1.0, num_images=1,
                    height=height, width=width)

    with caplog.at_level("WARNING", logger="kosmosg_core.generate"):
        sample(None, None)
        sample(64, 96)
        assert not caplog.records
        sample(64, 128)
        sample(64, 128)
        sample(128, 64)
    assert [r.getMessage().split(" px,")[0] for r in caplog.records] == ["sampling nano at 128x64",
                                                                         "sampling nano at 64x128"]
    assert "far from the 64 px it was made for: expect poor pictures (give height and width 64)" in caplog.text


def test_progress_bar_only_when_asked(tmp_path, capsys):
    """The CLI shows diffusers' step bar on a terminal (an SD1.5 image takes minutes on a CPU)."""
    for show in (False, True):
        generate_images(KOSMOSG_NANO, NANO_SD15, "a red circle on the left, on grey", out_dir=tmp_path, steps=3,
                        show_progress=show, negative_prompt=None)  # None: the official unconditional, as in encode
        assert ("3/3" in capsys.readouterr().err) == show


def test_a_diffusers_that_cannot_build_the_nano_model_says_what_to_install(monkeypatch):
    """A diffusers release without the modules the nano model is built from (an ImportError inside loading) is
    a missing package, not a damaged file; diffusers' lazy-import message gives its cause on the last line."""
    from kosmosg_core import sd15

    def old_diffusers(path, dtype):
        raise ImportError("cannot import name 'convert_ldm_unet_checkpoint'")

    monkeypatch.setattr(sd15, "load_nano_sd15", old_diffusers)
    with pytest.raises(MissingPackageError, match=r"generate needs diffusers >= 0.35.2 \(cannot import name "
                                                  r"'convert_ldm_unet_checkpoint'\); install it with"):
        load_sd15(NANO_SD15, torch.float32, torch.device("cpu"))
    lazy = RuntimeError("Failed to import diffusers.loaders.single_file_utils because of the following error (look "
                        "up to see its traceback):\nNo module named 'diffusers.loaders.single_file_utils'")
    assert "(No module named 'diffusers.loaders.single_file_utils')" in str(sd15._missing_diffusers(lazy))


def test_guidance_one_skips_the_unconditional_pass_and_below_one_is_refused(tmp_path, monkeypatch, caplog):
    """Found by a review: a guidance_scale at or below 1 sampled as 1 (diffusers guides only above 1) while the record
    said 0 or -2, and the negative prompt was encoded for nothing. Below 1 is refused by name; at 1 no unconditional
    encoding is made and a negative prompt is named as unused; the pictures are those of no negative prompt."""
    from kosmosg_core.errors import GenerationSettingsError
    from kosmosg_core.pipeline import KosmosGPipeline

    args = dict(checkpoint=KOSMOSG_NANO, sd_model=NANO_SD15, prompt="a <i> on grey", images=SUBJECT_IMAGES[:1],
                steps=2, seed=3)
    for bad in (0.5, 0, -2):
        with pytest.raises(GenerationSettingsError, match=rf"guidance_scale must be 1 \(no guidance: .*got {bad}"):
            generate_images(**args, guidance_scale=bad, out_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    unconditional = []
    original = KosmosGPipeline.encode_unconditional
    monkeypatch.setattr(KosmosGPipeline, "encode_unconditional",
                        lambda self, *a, **k: unconditional.append(a) or original(self, *a, **k))
    with caplog.at_level("WARNING", logger="kosmosg_core.generate"):
        plain = generate_images(**args, guidance_scale=1.0, out_dir=tmp_path / "plain")
        negative = generate_images(**args, guidance_scale=1.0, negative_prompt="a blue square",
                                   out_dir=tmp_path / "negative")
    assert unconditional == []
    assert "guidance_scale 1.0: no guidance, so the negative prompt 'a blue square' is not used" in caplog.text
    assert np.array_equal(np.asarray(Image.open(plain[0])), np.asarray(Image.open(negative[0])))
    generate_images(**args, guidance_scale=2.0, out_dir=tmp_path / "guided")
    assert len(unconditional) == 1


def test_a_step_count_the_scheduler_cannot_take_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    """Found by a review: --steps 1000 (and a damaged scheduler file) was refused after the Kosmos-G weights were read
    and the prompt encoded (an official .pt: a minute on a CPU), though the README says before the models load."""
    from kosmosg_core.errors import GenerationSettingsError
    from kosmosg_core.pipeline import KosmosGPipeline

    def no_model(*args, **kwargs):
        raise AssertionError("a model was opened")

    monkeypatch.setattr(KosmosGPipeline, "from_checkpoint", no_model)
    with pytest.raises(GenerationSettingsError, match="cannot run 1000 steps: .* use at most 999"):
        generate_images(KOSMOSG_NANO, NANO_SD15, "a <i> on grey", SUBJECT_IMAGES[:1], steps=1000, scheduler="ddim",
                        out_dir=tmp_path)
    import shutil

    from kosmosg_core.config import SD15_CONFIG_DIR

    folder = shutil.copytree(SD15_CONFIG_DIR, tmp_path / "config")  # SD1.5's, its scheduler settings damaged
    (folder / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": "many"}')
    single_file = tmp_path / "sd15.safetensors"  # never read: the settings are refused first
    single_file.write_bytes(b"\0" * 64)
    with pytest.raises(GenerationSettingsError, match=r"cannot be built with the settings in .*scheduler_config.json"):
        generate_images(KOSMOSG_NANO, single_file, "a <i> on grey", SUBJECT_IMAGES[:1], steps=5, out_dir=tmp_path,
                        sd_config_dir=folder)


def test_pictures_are_saved_as_they_are_sampled(tmp_path, monkeypatch):
    """Found by a review: every picture was saved at the end, so a Ctrl-C (or an error) late in a run of several
    lost all of them. Now each is written as soon as it is sampled; the run's picture k is the one it would be."""
    from kosmosg_core import generate

    calls = []
    original = generate.sample_sd15

    def interrupted_after_two(sd, *args, on_picture=None, **kwargs):
        def count(k, image):
            on_picture(k, image)
            calls.append(k)
            if len(calls) == 2:
                raise KeyboardInterrupt
        return original(sd, *args, on_picture=count, **kwargs)

    args = dict(checkpoint=KOSMOSG_NANO, sd_model=NANO_SD15, prompt="a <i> on grey", images=SUBJECT_IMAGES[:1],
                steps=2, seed=5, num_images=4)
    monkeypatch.setattr(generate, "sample_sd15", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        generate_images(**args, out_dir=tmp_path / "cut")
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["kosmosg_5_0.png", "kosmosg_5_1.png"]
    monkeypatch.setattr(generate, "sample_sd15", original)
    whole = generate_images(**args, out_dir=tmp_path / "whole")
    for k in range(2):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "cut" / f"kosmosg_5_{k}.png")),
                              np.asarray(Image.open(whole[k])))


def test_guided_sampling_without_the_unconditional_encoding_is_refused():
    """diffusers would encode "" with the text encoder the pipeline does not have: a named error instead."""
    from kosmosg_core.generate import sample_sd15

    with pytest.raises(ValueError, match="guidance_scale 2.0 needs the unconditional encoding"):
        sample_sd15(None, "nano", torch.zeros(1, 77, 768), None, [], steps=1, guidance_scale=2.0, num_images=1,
                    height=None, width=None)
