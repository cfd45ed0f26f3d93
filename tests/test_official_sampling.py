"""`generate` samples as the official code does: its schedulers step as diffusers 0.21.4's (which the official
code pins), and `--noise official` draws the official demo's starting noise.

The reference trajectories were computed by diffusers 0.21.4's own scheduler files
(tests/reference/generate_official_scheduler_outputs.py; stored in official_scheduler_outputs.safetensors).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from kosmosg_core.errors import DeviceError, GenerationSettingsError
from kosmosg_core.generate import generate_images
from kosmosg_core.sd15 import official_scheduler
from kosmosg_core.sampling import official_noise_generator, official_noise_levels, official_starting_noise
from reference.generate_official_scheduler_outputs import CASES, run_trajectory, sd15_schedule_config

STORED = Path(__file__).parent / "reference" / "official_scheduler_outputs.safetensors"
# float32 rounding between the two diffusers' arithmetic stays below 1e-6 here; a scheduler setting that changes
# the path (PNDM's Runge-Kutta warm-up steps, the smallest measured) moves the final latent by ~1e-5 or more
ATOL = 3e-6


@pytest.fixture(scope="module")
def stored() -> tuple[dict, dict]:
    with safe_open(str(STORED), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, json.loads(f.metadata()["timesteps"])


@pytest.mark.parametrize("name, steps", CASES)
def test_scheduler_follows_the_official_trajectory(stored, name, steps):
    finals, timesteps = stored
    final, ts = run_trajectory(official_scheduler(name, sd15_schedule_config()), steps)
    assert ts == timesteps[f"{name}.{steps}"]
    assert (final - finals[f"{name}.{steps}"]).abs().max() < ATOL


def test_the_stored_trajectories_tell_the_dpm_final_steps_apart(stored):
    """diffusers' own DPM-Solver default since 0.26 (a first-order last step to noise 0) ends elsewhere: the
    comparison above would catch it (0.04 mean difference at 50 steps on SD1.5 latents)."""
    import diffusers

    finals, _ = stored
    plain = diffusers.DPMSolverMultistepScheduler.from_config(sd15_schedule_config())
    final, _ = run_trajectory(plain, 50)
    assert (final - finals["dpm.50"]).abs().max() > 1e-2


@pytest.mark.parametrize("name, steps", CASES)
def test_official_noise_levels_are_the_official_schedulers(stored, name, steps):
    """What the ComfyUI node (Kosmos-G Official Sampler) steps through: the model's noise levels at the timesteps
    diffusers 0.21.4's DPM-Solver / DDIM / PNDM visited (PNDM visits its second twice: its Heun step), then its
    smallest (the timestep-0 level, where each ended)."""
    _, timesteps = stored
    table = torch.linspace(0.03, 14.6, 1000)  # any model's [T] levels: read at the timesteps, not recomputed
    levels = official_noise_levels(table, steps, name)
    visited = list(dict.fromkeys(timesteps[f"{name}.{steps}"]))  # in order, each once
    assert len(visited) == steps and torch.equal(levels, table[visited + [0]])


def test_official_noise_levels_take_ddim_and_pndm_at_every_step_count():
    """diffusers' DDIM (and PNDM) spacing with SD1.5's offset stays inside the table for every count the node
    offers."""
    table = torch.arange(1000.0)
    for steps in (1, 7, 333, 500, 501, 999):
        levels = official_noise_levels(table, steps, "ddim")
        assert levels.shape == (steps + 1,) and levels[0] <= 999 and levels[-2] == 1 and levels[-1] == 0
        assert torch.equal(official_noise_levels(table, steps, "pndm"), levels)
    with pytest.raises(GenerationSettingsError, match="scheduler 'euler' is not one the official sampler.*dpm, ddim, "
                                                      "pndm"):
        official_noise_levels(table, 50, "euler")


@pytest.mark.parametrize("table, steps, message", [
    (torch.ones(1000), 0, "steps must be a whole number between 1 and 999"),
    (torch.ones(1000), 1000, "between 1 and 999 .official demo: 50., got 1000"),
    (torch.ones(1000), True, "got True"),
    (torch.ones(2, 1000), 50, "one noise level per training timestep .* shape \\(2, 1000\\).*discrete-time"),
    (None, 50, "got NoneType"),
])
def test_official_noise_levels_refuse_what_they_cannot_space(table, steps, message):
    with pytest.raises(GenerationSettingsError, match=message):
        official_noise_levels(table, steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_official_noise_is_the_official_demos_draw(dtype):
    """`--noise official`: diffusers given one generator draws what the official code drew with none after
    torch.manual_seed(seed) (diffusers 0.21.4's randn_tensor: torch.randn on the device, in the dtype), and so does
    `official_starting_noise` (the ComfyUI node Kosmos-G Official Noise). The same checks run on a GPU in
    tests/test_cuda.py."""
    assert_official_starting_noise(torch.device("cpu"), dtype)
    assert_generate_draws_the_official_noise(torch.device("cpu"), dtype)


def demos_draw(device: torch.device, dtype: torch.dtype, shape) -> torch.Tensor:
    """The official demo's call for seed 7: torch.manual_seed, then one torch.randn of every picture's noise."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):  # others' seeds
        torch.manual_seed(7)
        return torch.randn(shape, generator=None, device=device, dtype=dtype)


def assert_official_starting_noise(device: torch.device, dtype: torch.dtype, shape=(3, 4, 8, 8)) -> None:
    """shape: three tiny pictures by default; the demo's is (4, 4, 64, 64) (four pictures at 512 px). No diffusers."""
    drawn = official_starting_noise(7, shape, device, dtype)
    assert drawn.dtype == dtype and torch.equal(drawn, demos_draw(device, dtype, shape))


def assert_generate_draws_the_official_noise(device: torch.device, dtype: torch.dtype, shape=(3, 4, 8, 8)) -> None:
    """What `generate --noise official` hands diffusers (one generator) draws the demo's noise."""
    from diffusers.utils.torch_utils import randn_tensor

    ours = randn_tensor(shape, generator=official_noise_generator(7, device), device=device, dtype=dtype)
    assert ours.dtype == dtype and torch.equal(ours, demos_draw(device, dtype, shape))


def test_generate_draws_the_chosen_noise(tmp_path):
    """The nano models through `generate`: "official" noise is one draw from the seed for all pictures, so its
    second picture is not "per-image"'s (seed + 1); one picture alone starts from the same CPU draw in both."""
    from support import nano_ootb

    repo = Path(__file__).resolve().parents[1]
    models = repo / "models" / "nano"
    images = [repo / "workflows" / "input" / subject.file for subject in nano_ootb.SUBJECTS]

    def pictures(noise: str, num_images: int) -> list[np.ndarray]:
        paths = generate_images(models / "kosmosg-nano.safetensors", models / "nano-sd15.safetensors", nano_ootb.PROMPT,
                                images, out_dir=tmp_path / f"{noise}{num_images}", steps=4, num_images=num_images,
                                noise=noise)
        return [np.asarray(Image.open(path)) for path in paths]

    official, per_image = pictures("official", 2), pictures("per-image", 2)
    assert not np.array_equal(official[1], per_image[1])
    assert np.array_equal(pictures("official", 1)[0], pictures("per-image", 1)[0])
    with pytest.raises(GenerationSettingsError, match="noise 'gpu' is not known: use one of per-image, official"):
        generate_images(models / "kosmosg-nano.safetensors", models / "nano-sd15.safetensors", "x", noise="gpu")


def test_official_noise_on_a_device_without_generators_fails_before_the_models_load(monkeypatch, tmp_path):
    """A backend whose tensors work but which has no torch.Generator (DirectML...) fails at once, with the fix,
    instead of after minutes of loading. The meta device stands in for it (it has no generator either)."""
    import kosmosg_core.generate as generate

    monkeypatch.setattr(generate, "resolve_device", lambda device: torch.device("meta"))
    monkeypatch.setattr(generate.KosmosGPipeline, "from_checkpoint", lambda *a, **k: pytest.fail("loaded a model"))
    models = Path(__file__).resolve().parents[1] / "models" / "nano"
    with pytest.raises(DeviceError, match="no random generator on 'meta'.*generate: noise 'per-image'"):
        generate_images(models / "kosmosg-nano.safetensors", models / "nano-sd15.safetensors", "a dog",
                        out_dir=tmp_path, noise="official")
