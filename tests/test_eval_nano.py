"""`python -m train.eval nano` (issue 9) on tiny random models in the shipped formats: JSON keys and ranges,
determinism by flags, held-out scenes and subject images only, the prompt wording of the training data,
the metrics on hand-made images, the grid, missing-file errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kosmosg_core.config import IMAGE_PLACEHOLDER
from support.argv import with_flags
from support.nano_models import write_kosmosg_nano_pack, write_shipped_nano_sd
from train.eval import nano_image, nano_kosmosg
from train.nano import judge, world
from train.nano.nano_data import render_image

REPO = Path(__file__).resolve().parents[1]
RUN_FLAGS = ["--samples", "5", "--steps", "2", "--batch-size", "2"]
HEADLINE = {  # metric -> the key of its sample count
    "single_subject_fidelity": "samples_single", "two_subject_fidelity": "samples_two", "subject_fidelity": "samples",
    "text_fidelity": "samples", "text_prompt_ceiling_single": "samples_single",
    "text_prompt_ceiling_two": "samples_two", "text_only_baseline": "samples", "random_baseline": "samples"}


def _eval_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "train.eval", "nano", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """The nano SD1.5 layout (export_nano) and a tiny Kosmos-G nano pack with the nano tokenizer inside."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("nano_kosmosg_eval")
    sd = write_shipped_nano_sd(root / "sd")
    return {"checkpoint": str(write_kosmosg_nano_pack(root / "kosmosg")), "sd_checkpoint": sd["checkpoint"],
            "text_encoder": sd["text_encoder"]}


def _flags(models: dict, *extra: str) -> list[str]:
    return with_flags(["--checkpoint", models["checkpoint"], "--sd-checkpoint", models["sd_checkpoint"],
                       "--text-encoder", models["text_encoder"], *RUN_FLAGS], *extra)


def _cases(seed: int, count: int = 12) -> list:
    pool = nano_kosmosg.SubjectImagePool(seed)
    return (nano_kosmosg.make_cases(nano_image.heldout_specs(count, 1, seed), pool)
            + nano_kosmosg.make_cases(nano_image.heldout_specs(count, 2, seed), pool))


# ----------------------------------------------------------------------------------- cases


def test_cases_are_held_out_and_subject_images_come_from_other_instances():
    cases = _cases(seed=0)
    donors_used = []
    for case in cases:
        assert world.split_of(case.target) == "heldout"
        assert len(case.subject_images) == len(case.donors) == len(case.target.subjects)
        for subject, (donor, k), image in zip(case.target.subjects, case.donors, case.subject_images):
            assert world.split_of(donor) == "heldout"  # never a training scene
            assert donor != case.target and donor.subjects[k] != subject  # another scene, another instance
            assert (donor.subjects[k].colour, donor.subjects[k].shape) == (subject.colour, subject.shape)
            assert donor.subjects[k].size != subject.size
            assert image.shape == (64, 64, 3) and image.dtype == np.uint8
            assert np.array_equal(image, world.render_scene(donor).masked_crops[k])  # the world's masked crop
            donors_used.append((donor.canonical(), k))
    assert len(set(donors_used)) == len(donors_used)  # each donor subject is handed out once
    targets = {c.target.canonical() for c in cases}
    assert not targets & {d for d, _ in donors_used}  # no target scene lends a subject image


def test_prompts_use_the_training_wording_without_subject_words():
    case = _cases(seed=0, count=1)[0]
    subject = case.target.subjects[0]
    where = world.POSITION_PHRASES[subject.position]
    article = "an" if subject.colour[0] in "aeiou" else "a"
    assert case.prompt == f"{article} {IMAGE_PLACEHOLDER} {where}, on {case.target.background}"
    assert case.text_only_prompt == f"{article} {where}, on {case.target.background}"
    for case in _cases(seed=0):
        assert case.prompt.count(IMAGE_PLACEHOLDER) == len(case.target.subjects)
        words = set(case.prompt.replace(",", " ").split())
        assert not words & (set(world.COLOURS) | set(world.SHAPES))  # the images stand for the subjects
        assert case.prompt.endswith(f", on {case.target.background}")


def test_prompts_match_what_the_data_step_writes_for_the_same_scenes(tmp_path):
    """The held-out shards of `python -m train.data build` carry the same caption-drop text."""
    from train.data.cli import main as data_main
    from train.data.shards import iter_records

    assert data_main(["build", "--output", str(tmp_path), "--source", "train.data.nano_labels:heldout", "--seed", "5",
                      "--count", "6", "--samples-per-shard", "6", "--target-size", "64", "--entity-size", "64",
                      "--log-level", "WARNING"]) == 0
    records = list(iter_records(sorted(str(p) for p in tmp_path.glob("*.tar"))))
    assert len(records) == 6
    for record in records:
        meta = json.loads(record["json"])
        split, seed, index = meta["origin"].split(":")[1:]
        spec = world.spec_at(int(seed), int(index), None, split)
        assert nano_kosmosg.interleaved_prompt(spec) == meta["text_dropped"]


def test_a_different_seed_draws_different_scenes_and_subject_images():
    first, again, other = _cases(seed=0, count=4), _cases(seed=0, count=4), _cases(seed=1, count=4)
    assert [c.target for c in first] == [c.target for c in again]
    assert [c.donors for c in first] == [c.donors for c in again]
    assert not {c.target.canonical() for c in first} & {c.target.canonical() for c in other}
    assert [c.donors for c in first] != [c.donors for c in other]


# ----------------------------------------------------------------------------------- metrics


def _two_subject_spec() -> world.SceneSpec:
    return world.make_spec(np.random.default_rng(3), [("red", "circle", "left"), ("blue", "square", "right")], "grey")


def test_metrics_on_hand_made_images():
    spec = _two_subject_spec()
    perfect = nano_kosmosg.judge_generation(render_image(spec), spec)
    assert perfect["all_correct"] and perfect["text"] and perfect["background"]

    left, right = spec.subjects
    recoloured = dataclasses.replace(spec, subjects=(dataclasses.replace(left, colour="green"), right))
    wrong_colour = nano_kosmosg.judge_generation(render_image(recoloured), spec)
    assert not wrong_colour["all_correct"] and not wrong_colour["colour"]
    assert wrong_colour["shape"] and wrong_colour["text"]  # the text asked for positions + background: right

    wrong_background = nano_kosmosg.judge_generation(render_image(dataclasses.replace(spec, background="white")), spec)
    assert wrong_background["all_correct"] and not wrong_background["background"] and not wrong_background["text"]

    moved = world.make_spec(np.random.default_rng(3), [("red", "circle", "centre"), ("blue", "square", "right")],
                            "grey")
    wrong_place = nano_kosmosg.judge_generation(render_image(moved), spec)
    assert not wrong_place["all_correct"] and not wrong_place["position"] and not wrong_place["text"]

    one_missing = nano_kosmosg.judge_generation(render_image(dataclasses.replace(spec, subjects=(left,))), spec)
    assert not one_missing["all_correct"] and not one_missing["count"]

    scores = [perfect, wrong_colour, wrong_background, wrong_place]
    subject = nano_image.score_fractions(scores, "s")
    assert subject["s"] == 0.5 and subject["s_stderr"] == pytest.approx(0.25) and subject["s_colour"] == 0.75
    text = nano_kosmosg.text_fractions(scores, "t")
    assert text == {"t": 0.5, "t_stderr": pytest.approx(0.25), "t_position": 0.75, "t_background": 0.75}


def test_read_background_names_world_backgrounds_only():
    for name, rgb in world.BACKGROUNDS.items():
        assert judge.read_background(np.full((64, 64, 3), rgb, np.uint8)) == name
    assert judge.read_background(np.full((64, 64, 3), world.PALETTE["red"], np.uint8)) is None


# ----------------------------------------------------------------------------------- the command


def test_cli_writes_the_json_and_grid_and_is_deterministic(models, tmp_path):
    first, second, grid = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "grid.png"
    proc = _eval_cli(*_flags(models, "--seed", "3", "--json", str(first), "--grid", str(grid), "--grid-rows", "3"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(first.read_text())
    assert json.loads(proc.stdout) == result
    assert all(key in proc.stderr for key in HEADLINE)  # the table

    for key, n_key in HEADLINE.items():
        assert 0.0 <= result[key] <= 1.0, key
        assert result[key + "_stderr"] == pytest.approx(nano_image.binomial_stderr(result[key], result[n_key])), key
    for key in ("text_only_baseline_single", "random_baseline_two", "single_subject_fidelity_colour",
                "text_fidelity_background", "text_fidelity_position"):
        assert 0.0 <= result[key] <= 1.0, key
    assert (result["samples"], result["samples_single"], result["samples_two"], result["seed"]) == (5, 3, 2, 3)
    assert result["examples"]["single"].count(IMAGE_PLACEHOLDER) == 1
    assert result["examples"]["two"].count(IMAGE_PLACEHOLDER) == 2
    assert result["sampler"]["steps"] == 2 and result["sampler"]["method"] == "ddim" and result["sampler"]["batch_size"] == 2

    with Image.open(grid) as image:  # 2 one-subject + 1 two-subject rows of 5 cells, 128 px each
        assert image.format == "PNG" and image.size == (4 + 5 * 132, 4 + 3 * 132)

    # the same flags in-process give byte-identical JSON
    again = nano_kosmosg.main(_flags(models, "--seed", "3", "--json", str(second)))
    assert second.read_bytes() == first.read_bytes() and again == result


def test_scores_follow_the_images_each_condition_gets(models, monkeypatch):
    """Wiring check with a stand-in generator: Kosmos-G and true-caption samples are renders of their
    target scenes, text-only samples bare backgrounds, random-condition samples renders of the
    unrelated scenes whose prompts they got."""
    recorded, calls = [], []
    real_make_cases = nano_kosmosg.make_cases

    def recording_make_cases(specs, pool):
        recorded.append(real_make_cases(specs, pool))  # per group: target cases, then random-baseline cases
        return recorded[-1]

    def fake_generate(unet, vae, context, uncond, cfg, noise_seed):
        group, condition = divmod(len(calls), 4)  # kosmos, true caption, text only, random
        calls.append((group, condition, noise_seed, context.clone()))
        targets, randoms = recorded[2 * group], recorded[2 * group + 1]
        assert context.shape == (len(targets), 77, 768) and uncond.shape == (1, 77, 768)
        if condition == 2:
            images = [np.broadcast_to(np.asarray(world.BACKGROUNDS[c.target.background], np.float32), (64, 64, 3))
                      for c in targets]
        else:
            images = [render_image(c.target).astype(np.float32) for c in (randoms if condition == 3 else targets)]
        return torch.from_numpy(np.stack(images) / 255.0)

    monkeypatch.setattr(nano_kosmosg, "make_cases", recording_make_cases)
    monkeypatch.setattr(nano_image, "generate", fake_generate)
    result = nano_kosmosg.main(_flags(models, "--samples", "8"))

    assert [len(r) for r in recorded] == [4, 4, 4, 4] and len(calls) == 8
    for group in (0, 1):  # one noise seed per group, shared by its four conditions
        assert len({seed for g, _, seed, _ in calls if g == group}) == 1
    assert calls[0][2] != calls[4][2]
    assert not torch.equal(calls[0][3], calls[2][3])  # the subject images change the condition
    assert result["single_subject_fidelity"] >= 0.75 and result["two_subject_fidelity"] >= 0.75
    assert result["text_prompt_ceiling_single"] >= 0.75 and result["text_fidelity"] >= 0.75
    assert result["text_only_baseline"] == 0.0 and result["text_only_baseline_count"] == 0.0
    assert result["random_baseline"] < result["subject_fidelity"]
    # the totals are over all N cases: the sample-weighted mean of the one- and two-subject groups
    for total, single, two in (("subject_fidelity", "single_subject_fidelity", "two_subject_fidelity"),
                               ("random_baseline", "random_baseline_single", "random_baseline_two"),
                               ("text_fidelity", "text_fidelity_single", "text_fidelity_two")):
        for suffix in ("", "_position"):
            weighted = (result[single + suffix] * result["samples_single"]
                        + result[two + suffix] * result["samples_two"]) / result["samples"]
            assert result[total + suffix] == pytest.approx(weighted), total + suffix


def test_missing_files_name_the_flag_and_the_command_that_makes_them(models, tmp_path):
    proc = _eval_cli(*_flags(models, "--checkpoint", str(tmp_path / "absent.safetensors")))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--checkpoint" in proc.stderr and "absent.safetensors" in proc.stderr and "train.export" in proc.stderr
    with pytest.raises(ValueError, match="--sd-checkpoint .*absent.*train.nano.export_nano"):
        nano_kosmosg.main(_flags(models, "--sd-checkpoint", str(tmp_path / "absent.safetensors")))
    with pytest.raises(ValueError, match="--text-encoder .*absent.*train.nano.train_"):
        nano_kosmosg.main(_flags(models, "--text-encoder", str(tmp_path / "absent")))
    with pytest.raises(ValueError, match="--tokenizer .*absent.*nano_tokenizer"):
        nano_kosmosg.main(_flags(models, "--tokenizer", str(tmp_path / "absent")))
    with pytest.raises(ValueError, match="--samples"):
        nano_kosmosg.main(_flags(models, "--samples", "1"))
    with pytest.raises(ValueError, match="--grid .*png"):
        nano_kosmosg.main(_flags(models, "--grid", str(tmp_path / "grid.jpg")))


def test_help_lists_the_flags_and_defaults():
    proc = _eval_cli("--help")
    assert proc.returncode == 0
    for flag in ("--samples", "--seed", "--json", "--grid", "--checkpoint", "--tokenizer", "--sd-checkpoint",
                 "--text-encoder", "--guidance", "--steps"):
        assert flag in proc.stdout
    for default in ("models/nano/kosmosg-nano.safetensors", "models/nano/nano-sd15.safetensors",
                    "models/nano/text-encoder"):
        assert default in proc.stdout.replace("\n", "").replace(" ", "")
