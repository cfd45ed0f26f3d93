"""The official demo's sampling, without diffusers (the ComfyUI nodes do not need it): the noise levels its
DPM-Solver (or DDIM, or PNDM) steps through, on any discrete-time model's noise schedule, and its starting noise.

The ComfyUI nodes Kosmos-G Official Sampler and Official Noise give these to ComfyUI's own sampling; `generate`
runs diffusers' scheduler (sd15.official_scheduler; tests/test_official_sampling.py checks the two agree) and
hands diffusers `official_noise_generator`.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import torch

from .config import DEFAULT_SCHEDULER, DEFAULT_STEPS, SCHEDULERS, SD15_CONFIG_DIR
from .errors import DeviceError, GenerationSettingsError, first_line


OFFICIAL_SAMPLER_SCHEDULERS = tuple(SCHEDULERS)  # the demo's three (nodes/sampling.py steps each as it does)


@functools.cache
def sd15_steps_offset() -> int:
    """SD1.5's scheduler `steps_offset` (1): DDIM's and PNDM's timesteps are shifted by it."""
    return int(json.loads((SD15_CONFIG_DIR / "scheduler" / "scheduler_config.json").read_text())["steps_offset"])


def official_noise_levels(sigmas: torch.Tensor, steps: int = DEFAULT_STEPS, scheduler: str = DEFAULT_SCHEDULER) -> torch.Tensor:
    """The noise levels [steps + 1] the official demo's DPM-Solver (or DDIM, or PNDM) steps through, on a model's own
    noise schedule.

    sigmas: [T] float, the model's noise level at each training timestep 0..T-1 (SD1.5: T = 1000, 0.029 ... 14.6).
    Returns sigmas at the timesteps diffusers 0.21.4's scheduler visits, then sigmas[0], where its last step ends:
    - "dpm": DPM-Solver's "linspace" spacing (the default then and now: T-1 down to 0 in `steps` even strides,
      rounded to whole timesteps, the last one, 0, dropped), ending at sigmas[0] (config.SCHEDULER_SETTINGS).
      k-diffusion's `dpmpp_2m` through these levels, from noise scaled to sqrt(1 + sigma_max^2), with a first-order
      last step below DPM_SOLVER_FIRST_ORDER_FINAL_BELOW steps, is the official sampler step for step;
    - "ddim": DDIM's "leading" spacing (every (T // steps)-th timestep from 0, plus SD1.5's steps_offset, high to
      low), its last step going to alphas_cumprod[0] (SD1.5's set_alpha_to_one is false). DDIM with eta 0 is the
      Euler step in ComfyUI's scaling, from noise scaled to sqrt(1 + sigma^2) at the first level;
    - "pndm": DDIM's levels (SD1.5's PNDM: "leading" spacing, skip_prk_steps, the same last step). Each PNDM step is
      DDIM's step with a blend of the noise predictions so far (the node's sample_pndm).
    (the ComfyUI node Kosmos-G Official Sampler; tests/test_nodes_unit.py)."""
    if scheduler not in OFFICIAL_SAMPLER_SCHEDULERS:
        raise GenerationSettingsError(f"scheduler {scheduler!r} is not one the official sampler steps as the demo does: "
                                      f"use one of {', '.join(OFFICIAL_SAMPLER_SCHEDULERS)}.")
    total = int(sigmas.shape[0]) if isinstance(sigmas, torch.Tensor) and sigmas.ndim == 1 else 0
    if total < 2:
        raise GenerationSettingsError(f"The model's noise schedule must list one noise level per training timestep "
                                      f"(a 1-D table, SD1.5: 1000), got {_shape_or_type(sigmas)}; the official sampler "
                                      "needs a discrete-time (SD1.5-type) model.")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < total:
        raise GenerationSettingsError(f"steps must be a whole number between 1 and {total - 1} (official demo: "
                                      f"{DEFAULT_STEPS}), got {steps!r}.")
    if scheduler == "dpm":  # strides of (T-1)/steps >= 1 never round two timesteps together
        timesteps = np.linspace(0, total - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    else:  # DDIM, PNDM: the last, (steps - 1) * (T // steps) + offset, stays below T for every steps < T
        timesteps = np.arange(steps)[::-1] * (total // steps) + sd15_steps_offset()
    timesteps = torch.from_numpy(timesteps.copy())
    table = sigmas.detach().float().cpu()
    return torch.cat([table[timesteps], table[:1]])


def _shape_or_type(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def official_noise_generator(seed: int, device) -> torch.Generator:
    """One generator on the sampling device, seeded like the official demo seeds the default one
    (torch.manual_seed(seed)): given to diffusers alone (not one per image), it draws every picture's noise
    [N, 4, H/8, W/8] in one call on that device in the sampling dtype, as the official code's randn_tensor does
    without a generator (diffusers 0.21.4). A picture's noise then depends on the device's random generator, and may
    depend on N (on a GPU whose threads do not cover the whole draw)."""
    try:
        return torch.Generator(device).manual_seed(seed)
    except Exception as e:  # a backend without generators of its own (DirectML...): each fails its own way
        raise DeviceError(f"The official demo's noise is drawn on the sampling device, but this PyTorch has no random "
                          f"generator on {str(device)!r} ({first_line(e)}); draw it on the CPU (generate: noise "
                          "'per-image'; ComfyUI: RandomNoise).") from e


def official_starting_noise(seed: int, shape, device, dtype: torch.dtype) -> torch.Tensor:
    """The official demo's starting noise `shape` ([N, 4, H/8, W/8]: every picture's, in one draw) for `seed`, drawn
    on `device` in `dtype` as diffusers 0.21.4's randn_tensor drew it (the demo: a CUDA GPU, float16)."""
    return torch.randn(tuple(shape), generator=official_noise_generator(seed, device), device=device, dtype=dtype)
