"""`python -m train.eval nano-image` (issue 8 point 6) on a tiny model exported by train.nano.export_nano:
JSON keys and ranges, the --grid PNG, determinism by --seed, the held-out caption split, --help, missing-file errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from support.argv import with_flags
from support.nano_models import write_shipped_nano_sd
from train.eval import nano_image
from train.nano import world

REPO = Path(__file__).resolve().parents[1]
RUN_FLAGS = ["--samples", "5", "--steps", "2", "--judge-samples", "3", "--batch-size", "2"]


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    return env


def _eval_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.eval", "nano-image", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> dict:
    """A fixture-size nano model written by the real export path, plus the networks it came from."""
    torch.set_num_threads(1)
    return write_shipped_nano_sd(tmp_path_factory.mktemp("nano_image"))


def _flags(shipped: dict, *extra: str) -> list[str]:
    return with_flags(["--checkpoint", shipped["checkpoint"], "--text-encoder", shipped["text_encoder"], *RUN_FLAGS],
                      *extra)


def test_loads_the_shipped_files_back_into_the_exported_networks(shipped):
    unet, vae, _, _ = nano_image.load_shipped_model(shipped["checkpoint"], shipped["text_encoder"])
    assert unet.config == shipped["unet"].config
    for name, tensor in shipped["unet"].state_dict().items():  # fp16 round trip of the narrow weights
        assert torch.allclose(unet.state_dict()[name], tensor, atol=1e-3, rtol=1e-2), name
    assert abs(float(vae.vae_scale) - 1.3) < 1e-2 and abs(float(vae.vae_shift) - 0.1) < 1e-3
    for name, tensor in shipped["vae"].taesd_decoder.state_dict().items():
        assert torch.allclose(vae.taesd_decoder.state_dict()[name], tensor, atol=1e-3, rtol=1e-2), name


def test_heldout_captions_are_split_by_subject_count_and_chosen_by_seed():
    single, two = nano_image.heldout_specs(4, 1, seed=0), nano_image.heldout_specs(3, 2, seed=0)
    assert [len(s.subjects) for s in single] == [1] * 4 and [len(s.subjects) for s in two] == [2] * 3
    assert all(world.split_of(s) == "heldout" for s in single + two)
    assert nano_image.heldout_specs(4, 1, seed=0) == single  # deterministic
    other = nano_image.heldout_specs(4, 1, seed=1)
    assert [world.caption_of(s) for s in other] != [world.caption_of(s) for s in single]


def test_binomial_stderr():
    assert nano_image.binomial_stderr(0.5, 100) == pytest.approx(0.05)
    assert nano_image.binomial_stderr(1.0, 10) == 0.0
    scores = [{"all_correct": a, "count": True, "colour": c, "shape": a, "position": True}
              for a, c in [(True, True), (False, True), (False, False), (True, True)]]
    out = nano_image.score_fractions(scores, "x")
    assert out["x"] == 0.5 and out["x_stderr"] == pytest.approx(0.25) and out["x_colour"] == 0.75
    assert out["x_count"] == 1.0


def test_generate_draws_new_noise_for_every_batch(shipped):
    """Batch b is sampled from noise seed noise_seed + b: the same caption in two batches of one gives
    two different images [N, 64, 64, 3], and the same seed gives the same images again."""
    from train.nano import text_encoder as te

    unet, vae, text_model, tokenizer = nano_image.load_shipped_model(shipped["checkpoint"], shipped["text_encoder"])
    context = te.encode_captions(text_model, tokenizer, ["a red circle on the left, on grey"]).expand(2, -1, -1)
    cfg = nano_image.NanoImageConfig(steps=2, batch_size=1)
    images = nano_image.generate(unet, vae, context, None, cfg, noise_seed=7)
    assert images.shape == (2, 64, 64, 3)
    assert not torch.equal(images[0], images[1])
    assert torch.equal(nano_image.generate(unet, vae, context, None, cfg, noise_seed=7), images)


def test_grid_rows_are_half_one_subject_rounded_up():
    """--grid-rows R: the first ceil(R / 2) rows show one-subject cases, the other floor(R / 2) two-subject ones."""
    assert [nano_image.grid_rows_for("single", r) for r in (1, 2, 3, 4)] == [1, 1, 2, 2]
    assert [nano_image.grid_rows_for("two", r) for r in (1, 2, 3, 4)] == [0, 1, 1, 2]


def test_cli_writes_the_json_and_is_deterministic_by_seed(shipped, tmp_path):
    first, second, grid = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "grid.png"
    proc = _eval_cli(*_flags(shipped, "--seed", "3", "--json", str(first), "--grid", str(grid), "--grid-rows", "3"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(first.read_text())
    assert json.loads(proc.stdout) == result
    assert "text_to_image_single" in proc.stderr and "judge_accuracy" in proc.stderr  # the table

    for key in ("text_to_image_single", "text_to_image_two", "text_to_image", "unconditional_baseline",
                "unconditional_baseline_single", "unconditional_baseline_two", "judge_accuracy"):
        assert 0.0 <= result[key] <= 1.0, key
        assert 0.0 <= result[key + "_stderr"] <= 0.5, key
        n = result["judge_samples" if key == "judge_accuracy" else
                   "samples_single" if key.endswith("single") else "samples_two" if key.endswith("two") else "samples"]
        assert result[key + "_stderr"] == pytest.approx(nano_image.binomial_stderr(result[key], n))
    assert result["samples"] == 5 and result["samples_single"] == 3 and result["samples_two"] == 2
    assert result["judge_samples"] == 3 and result["judge_accuracy"] == 1.0  # the judge reads real scenes right
    # the batch size too: each batch's noise is seeded by its number, so results depend on it (a review found the
    # help saying noise was drawn per case)
    assert result["sampler"] == {"method": "ddim", "steps": 2, "guidance": 5.0, "batch_size": 2,
                                 "uncond": "empty caption", "latent_shape": [4, 8, 8]}
    assert result["seed"] == 3
    from PIL import Image

    with Image.open(grid) as image:  # 2 one-subject + 1 two-subject rows of 3 cells (scene, sample, uncond), 128 px
        assert image.size == (4 + 3 * 132, 4 + 3 * 132)
        pixels = np.asarray(image.convert("RGB"))
    first_scene = world.render_scene(nano_image.heldout_specs(1, 1, 3)[0]).image
    assert (pixels[4:132:2, 4:132:2] == first_scene).all()  # row 1, cell 1: the scene its caption describes

    # the same flags in-process give byte-identical JSON
    again = nano_image.main(_flags(shipped, "--seed", "3", "--json", str(second)))
    assert second.read_bytes() == first.read_bytes() and again == result


def test_help_lists_the_flags():
    proc = _eval_cli("--help")
    assert proc.returncode == 0
    for flag in ("--samples", "--seed", "--json", "--checkpoint", "--text-encoder", "--guidance", "--steps"):
        assert flag in proc.stdout
    assert "models/nano/nano-sd15.safetensors" in proc.stdout and "models/nano/text-encoder" in proc.stdout


def test_missing_files_name_the_flag_and_how_to_make_the_model(shipped, tmp_path):
    proc = _eval_cli("--checkpoint", str(tmp_path / "absent.safetensors"), "--text-encoder", shipped["text_encoder"])
    assert proc.returncode == 2
    assert "--checkpoint" in proc.stderr and "train.nano.export_nano" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(ValueError, match="--text-encoder.*train.nano.train_"):
        nano_image.main(["--checkpoint", shipped["checkpoint"], "--text-encoder", str(tmp_path / "absent")])
    with pytest.raises(ValueError, match="--samples"):
        nano_image.main(_flags(shipped, "--samples", "1"))


def test_scores_follow_the_images_each_caption_gets(shipped, monkeypatch):
    """Wiring check with a stand-in generator: captioned samples are the true renders of their scenes
    (the judge should pass nearly all), empty-caption samples are bare backgrounds (it must fail all)."""
    import numpy as np

    from train.nano.nano_data import render_image

    groups, calls, seeds = [], [], []
    real_specs = nano_image.heldout_specs

    def recording_specs(count, num_subjects, seed):
        groups.append(real_specs(count, num_subjects, seed))
        return groups[-1]

    def fake_generate(unet, vae, context, uncond, cfg, noise_seed):
        specs = groups[len(calls) // 2]  # calls: single captioned, single empty, two captioned, two empty
        calls.append(uncond is None)
        seeds.append(noise_seed)
        assert context.shape == (len(specs), 77, 768)
        if uncond is None:  # the unconditional baseline: nothing drawn
            images = [np.broadcast_to(np.asarray(world.BACKGROUNDS[s.background], np.float32), (64, 64, 3))
                      for s in specs]
        else:
            images = [render_image(s).astype(np.float32) for s in specs]
        return torch.from_numpy(np.stack(images) / 255.0)

    monkeypatch.setattr(nano_image, "heldout_specs", recording_specs)
    monkeypatch.setattr(nano_image, "generate", fake_generate)
    result = nano_image.main(_flags(shipped, "--samples", "8"))
    assert [len(g) for g in groups] == [4, 4] and calls == [False, True, False, True]
    assert result["text_to_image_single"] >= 0.75 and result["text_to_image_two"] >= 0.75
    assert result["unconditional_baseline"] == 0.0 and result["unconditional_baseline_count"] == 0.0
    # the baseline of a group starts from the same noise as its captioned samples; groups differ
    assert seeds[0] == seeds[1] and seeds[2] == seeds[3] and seeds[0] != seeds[2]
    # the judge is measured on min(--samples, --judge-samples) real scenes
    assert result["judge_samples"] == 3
    assert nano_image.main(_flags(shipped, "--samples", "2"))["judge_samples"] == 2
