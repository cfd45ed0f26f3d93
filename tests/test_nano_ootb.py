"""The out-of-the-box workflow's request (tests/support/nano_ootb.py): shipped subject images, prompt
wording, sampler settings against the nano evaluation, and the judge of its output on world renders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support import make_workflows, nano_ootb
from train.eval import nano_kosmosg
from train.nano import sampler as nano_sampler
from train.nano import world

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "workflows" / "kosmosg-nano-out-of-the-box.json"
ASKED = [("red", "circle", "left"), ("blue", "square", "right")]


def workflow_nodes(kind: str) -> list[dict]:
    return [n for n in json.loads(WORKFLOW.read_text())["nodes"] if n["type"] == kind]


def render(subjects, background: str, seed: int) -> np.ndarray:
    """A world scene uint8 [64, 64, 3] showing ``subjects`` (colour, shape, position) on ``background``."""
    return world.render_scene(world.make_spec(np.random.default_rng(seed), subjects, background)).image


# ----------------------------------------------------------------------------- subject images


def test_shipped_subject_images_are_heldout_masked_crops_of_their_subjects():
    regenerated = nano_ootb.subject_images()
    for subject, image in zip(nano_ootb.SUBJECTS, regenerated):
        shipped = np.asarray(Image.open(REPO / "workflows" / "input" / subject.file).convert("RGB"))
        assert np.array_equal(shipped, image), f"{subject.file} differs; run python tests/support/make_workflows.py"
        spec, k = nano_kosmosg.first_heldout_subject(subject.colour, subject.shape, nano_ootb.SUBJECT_SCENES_START)
        assert world.split_of(spec) == "heldout"
        assert (spec.subjects[k].colour, spec.subjects[k].shape) == (subject.colour, subject.shape)
        assert np.array_equal(image, world.render_scene(spec).masked_crops[k])
        # the subject on white: the corners are white, the centre is the subject's colour
        assert tuple(image[0, 0]) == world.BACKGROUNDS["white"]
        assert tuple(image[32, 32]) == world.PALETTE[subject.colour]
    assert len({s.colour for s in nano_ootb.SUBJECTS}) == 2 and len({s.shape for s in nano_ootb.SUBJECTS}) == 2


def test_first_heldout_subject_is_the_first_match_of_the_stream():
    spec, k = nano_kosmosg.first_heldout_subject("blue", "square", start=0)
    index = next(i for i in range(10_000) if world.spec_at(world.HELDOUT_SEED, i) == spec)
    assert all(("blue", "square") not in {(s.colour, s.shape) for s in world.spec_at(world.HELDOUT_SEED, i).subjects}
               for i in range(index))
    later, _ = nano_kosmosg.first_heldout_subject("blue", "square", start=index + 1)
    assert later != spec
    with pytest.raises(ValueError, match="'pink'"):
        nano_kosmosg.first_heldout_subject("pink", "square")


def test_write_subject_images_writes_the_named_pngs(tmp_path):
    paths = nano_ootb.write_subject_images(tmp_path / "input")
    assert [p.name for p in paths] == [s.file for s in nano_ootb.SUBJECTS]
    for path, image in zip(paths, nano_ootb.subject_images()):
        assert np.array_equal(np.asarray(Image.open(path)), image)


# ----------------------------------------------------------------------------- prompt + workflow


def test_prompt_is_the_nano_evaluation_wording():
    assert nano_ootb.asked_scene() == (ASKED, "grey")
    spec = world.make_spec(np.random.default_rng(0), ASKED, "grey")
    assert nano_ootb.PROMPT == nano_kosmosg.interleaved_prompt(spec)


def test_shipped_workflow_is_the_generated_one():
    generated = make_workflows.all_workflows()["kosmosg-nano-out-of-the-box"].to_json()
    assert json.loads(WORKFLOW.read_text()) == generated, "run python tests/support/make_workflows.py"


def test_workflow_asks_for_the_subjects_prompt_and_eval_sampler():
    assert [n["widgets_values"][0] for n in workflow_nodes("LoadImage")] == [s.file for s in nano_ootb.SUBJECTS]
    (prompt,) = workflow_nodes("KosmosGInterleavedPrompt")
    assert prompt["widgets_values"][0] == nano_ootb.PROMPT
    assert [i["link"] is not None for i in prompt["inputs"]] == [True, True, False]  # image0, image1 + empty slot
    (latent,) = workflow_nodes("EmptyLatentImage")
    assert latent["widgets_values"][:2] == [64, 64]
    (ksampler,) = workflow_nodes("KSampler")
    _seed, _control, steps, cfg, sampler_name, scheduler, denoise = ksampler["widgets_values"]
    evaluation = nano_kosmosg.NanoKosmosGConfig()
    assert (steps, cfg, denoise) == (evaluation.steps, evaluation.guidance, 1.0)
    assert evaluation.method == "ddim" and (sampler_name, scheduler) == ("euler", "normal")
    (note,) = workflow_nodes("MarkdownNote")
    for fact in (nano_ootb.SUBJECTS[0].file, nano_ootb.SUBJECTS[1].file, "`euler` + `normal`", "20 steps", "CFG 5"):
        assert fact in note["widgets_values"][0]


def test_workflow_sampler_reproduces_the_evaluation_sampler():
    """ComfyUI's own scheduler + k-diffusion sampler, by the names the workflow uses, on a toy eps model
    equal train.nano.sampler's DDIM (what train.eval nano runs); ddim_uniform would not."""
    from support.comfy_modules import import_comfy

    import_comfy()
    import comfy.k_diffusion.sampling as k_sampling
    import comfy.model_sampling
    import comfy.samplers

    (ksampler,) = workflow_nodes("KSampler")
    _, _, steps, _, sampler_name, scheduler, _ = ksampler["widgets_values"]
    sd15 = comfy.model_sampling.ModelSamplingDiscrete(model_config=None)  # SD1.5's scaled-linear schedule
    context = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(1))

    def eps_model(x, t, ctx):  # x [B, 4, 8, 8], t [B] -> eps [B, 4, 8, 8]; smooth in x and t
        tt = t.float()[:, None, None, None] / 1000
        return torch.tanh(x * (1 + tt)) * 0.8 + 0.3 * torch.sin(3 * tt + ctx.mean())

    expected = nano_sampler.sample(eps_model, context, None, steps=steps, seed=3, method="ddim")  # [2, 4, 8, 8]
    noise = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3))

    def comfy_run(sampler: str, schedule: str) -> torch.Tensor:
        sigmas = comfy.samplers.calculate_sigmas(sd15, schedule, steps).float()

        def denoiser(x, sigma, **_):  # ComfyUI's epsilon model wrapper: x0 = x - sigma * eps(x / sqrt(1 + s^2), t)
            s = sigma[:, None, None, None]
            return x - s * eps_model(x / (1 + s ** 2).sqrt(), sd15.timestep(sigma), context)

        x = noise * (1 + sigmas[0] ** 2).sqrt()
        return getattr(k_sampling, f"sample_{sampler}")(denoiser, x, sigmas, disable=True)

    scale = expected.abs().max().item()
    assert (comfy_run(sampler_name, scheduler) - expected).abs().max().item() < 1e-4 * scale
    assert (comfy_run(sampler_name, "ddim_uniform") - expected).abs().max().item() > 1e-2 * scale


# ----------------------------------------------------------------------------- judging the output


@pytest.mark.parametrize("seed", range(4))
def test_judge_accepts_a_render_of_the_asked_scene(seed):
    score = nano_ootb.judge_output(render(ASKED, "grey", seed))
    assert score["right"] and score["all_correct"] and score["background"]


@pytest.mark.parametrize("seed", range(4))
def test_judge_rejects_swapped_subjects(seed):
    swapped = [("blue", "square", "left"), ("red", "circle", "right")]
    score = nano_ootb.judge_output(render(swapped, "grey", seed))
    assert not score["right"] and not score["all_correct"]
    assert score["count"] and score["background"]  # two subjects on grey, each in the wrong place


def test_judge_rejects_wrong_background_missing_subject_and_wrong_shape():
    on_white = nano_ootb.judge_output(render(ASKED, "white", 0))
    assert on_white["all_correct"] and not on_white["background"] and not on_white["right"]
    only_one = nano_ootb.judge_output(render(ASKED[:1], "grey", 0))
    assert not only_one["count"] and not only_one["right"]
    triangle = nano_ootb.judge_output(render([("red", "triangle", "left"), ASKED[1]], "grey", 0))
    assert not triangle["shape"] and triangle["colour"] and not triangle["right"]


def test_judge_reads_float_images_like_comfyui_outputs():
    image = render(ASKED, "grey", 1).astype(np.float32) / 255.0  # VAEDecode's IMAGE: float 0..1
    assert nano_ootb.judge_output(image)["right"]
