"""The shipped nano image model (models/nano/nano-sd15.safetensors + models/nano/text-encoder/).

- the files are inside the shipping budget (fp16 checkpoint <= 60 MB, text encoder <= 20 MB);
- the README's figures (docs/results/nano-image.json, written by the documented eval command)
  are reproduced by the eval on a small sample within two binomial standard errors;
- integration: stock ComfyUI loads the file as SD1.5 with its VAE, and held-out captions sampled
  with ComfyUI's own sampler are judged right.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train.eval import nano_image

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CHECKPOINT = REPO / "models" / "nano" / "nano-sd15.safetensors"
SHIPPED_TEXT_ENCODER = REPO / "models" / "nano" / "text-encoder"
README_FIGURES = REPO / "docs" / "results" / "nano-image.json"


def test_shipped_files_are_inside_the_budget_and_fp16():
    from safetensors import safe_open

    assert SHIPPED_CHECKPOINT.stat().st_size <= 60 * 1000 * 1000
    text_bytes = sum(p.stat().st_size for p in SHIPPED_TEXT_ENCODER.rglob("*") if p.is_file())
    assert text_bytes <= 20 * 1000 * 1000
    with safe_open(str(SHIPPED_CHECKPOINT), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}


def test_readme_shows_the_recorded_figures():
    figures = json.loads(README_FIGURES.read_text())
    readme = (REPO / "README.md").read_text()
    for key in ("text_to_image_single", "text_to_image_two", "unconditional_baseline", "judge_accuracy"):
        assert f"{figures[key]:.3f}" in readme, key


def test_small_eval_reproduces_the_readme_figures_within_noise():
    figures = json.loads(README_FIGURES.read_text())
    cfg = nano_image.NanoImageConfig(samples=48, seed=1, judge_samples=48, checkpoint=str(SHIPPED_CHECKPOINT),
                                     text_encoder=str(SHIPPED_TEXT_ENCODER), num_threads=1)
    small = nano_image.run(cfg)
    for key, n in (("text_to_image_single", 24), ("text_to_image_two", 24)):
        recorded = figures[key]
        # two binomial standard errors of the small sample at the recorded rate (plus the recorded
        # run's own error), never less than one image's worth
        margin = 2 * (nano_image.binomial_stderr(recorded, n) + figures[key + "_stderr"]) + 1 / n
        assert abs(small[key] - recorded) <= margin, (key, small[key], recorded, margin)
    assert small["unconditional_baseline"] <= 0.2


@pytest.mark.integration
def test_comfyui_loads_the_shipped_file_as_sd15_and_samples_heldout_captions_judged_right():
    from support.comfy_modules import import_comfy

    comfy = import_comfy()
    import comfy.sample
    import comfy.supported_models

    from train.nano import judge, world
    from train.nano import text_encoder as te

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(SHIPPED_CHECKPOINT), output_vae=True,
                                                             output_clip=False)[:3]
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert type(vae.first_stage_model).__name__ == "TAESD"

    text_model, tokenizer = te.load_text_encoder(SHIPPED_TEXT_ENCODER)
    specs = nano_image.heldout_specs(8, 1, seed=0)
    right = []
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        context = te.encode_captions(text_model.float(), tokenizer, [world.caption_of(s) for s in specs])  # [8, 77, 768]
        empty = te.encode_captions(text_model.float(), tokenizer, [""])  # [1, 77, 768]
        for i, spec in enumerate(specs):
            latent = torch.zeros(1, 4, 8, 8)
            noise = comfy.sample.prepare_noise(latent, i)
            samples = comfy.sample.sample(model, noise, 20, 5.0, "euler", "normal", [[context[i:i + 1], {}]],
                                          [[empty, {}]], latent, seed=i, disable_pbar=True)
            pixels = vae.decode(samples)  # [1, 64, 64, 3] in 0..1
            assert pixels.shape == (1, 64, 64, 3)
            right.append(bool(judge.score_against(pixels[0].float().numpy(), spec.subjects)["all_correct"]))
    print(f"ComfyUI-sampled held-out captions judged right: {sum(right)}/{len(right)}")
    assert sum(right) >= 6, right
