"""`generate`'s schedulers step as the official code's do (diffusers 0.21.4, which it pins).

The reference trajectories were computed by diffusers 0.21.4's own scheduler files
(tests/reference/generate_official_scheduler_outputs.py; stored in official_scheduler_outputs.safetensors).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from kosmosg_core.generate import official_scheduler
from reference.generate_official_scheduler_outputs import CASES, run_trajectory, sd15_schedule_config

STORED = Path(__file__).parent / "reference" / "official_scheduler_outputs.safetensors"


@pytest.fixture(scope="module")
def stored() -> tuple[dict, dict]:
    with safe_open(str(STORED), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, json.loads(f.metadata()["timesteps"])


@pytest.mark.parametrize("name, steps", CASES)
def test_scheduler_follows_the_official_trajectory(stored, name, steps):
    finals, timesteps = stored
    final, ts = run_trajectory(official_scheduler(name, sd15_schedule_config()), steps)
    assert ts == timesteps[f"{name}.{steps}"]
    assert (final - finals[f"{name}.{steps}"]).abs().max() < 1e-5


def test_the_stored_trajectories_tell_the_dpm_final_steps_apart(stored):
    """diffusers' own DPM-Solver default since 0.25 (a first-order last step to noise 0) ends elsewhere: the
    comparison above would catch it (0.04 mean difference at 50 steps on SD1.5 latents)."""
    import diffusers

    finals, _ = stored
    plain = diffusers.DPMSolverMultistepScheduler.from_config(sd15_schedule_config())
    final, _ = run_trajectory(plain, 50)
    assert (final - finals["dpm.50"]).abs().max() > 1e-2
