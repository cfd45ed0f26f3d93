"""Kosmos-G Official Sampler: the official demo's DPM-Solver (or DDIM) as a SAMPLER + SIGMAS pair for SamplerCustom;
Kosmos-G Official Noise: the demo's starting noise as a NOISE for SamplerCustomAdvanced.

The official demo samples with diffusers' DPM-Solver multistep (50 steps; its DDIM on request). ComfyUI's
`dpmpp_2m` is the same solver (and its `euler` DDIM's step); what KSampler's schedulers cannot give is the official
grid of noise levels (diffusers' whole timesteps, ending at the smallest noise level, not at 0), nor, below 15 steps,
the first-order last step, nor DDIM's start from plain noise below the largest noise level. This node gives all of it
(the noise levels from kosmosg_core.sampling.official_noise_levels, on the connected model's own noise schedule).
The match holds for the whole sigmas, from an empty latent with noise added, as SamplerCustom's `output`.
"""

from __future__ import annotations

import functools
import logging
import math

import comfy.k_diffusion.sampling as k_sampling
import comfy.model_management as mm
import comfy.model_sampling
import comfy.samplers
import torch
from comfy_api.latest import io

from ..kosmosg_core.config import DEFAULT_STEPS, DPM_SOLVER_FIRST_ORDER_FINAL_BELOW
from ..kosmosg_core.errors import GenerationSettingsError
from ..kosmosg_core.sampling import OFFICIAL_SAMPLER_SCHEDULERS, official_noise_levels, official_starting_noise
from .types import CATEGORY

logger = logging.getLogger(__name__)


@torch.no_grad()
def sample_dpmpp_2m_first_order_final(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """`dpmpp_2m` to the next-to-last noise level, then one first-order step: diffusers' DPM-Solver below
    DPM_SOLVER_FIRST_ORDER_FINAL_BELOW steps. DPM-Solver++'s first-order step is the DDIM step, which in ComfyUI's
    scaling (x = data + sigma * noise) is the Euler step. One console bar (dpmpp_2m's, one step short): the
    progress callback, ComfyUI's own bar, counts every step."""
    x = k_sampling.sample_dpmpp_2m(model, x, sigmas[:-1], extra_args=extra_args, callback=callback, disable=disable)
    last = len(sigmas) - 2  # the step index the progress callback reports for the last step
    shifted = None if callback is None else (lambda info: callback({**info, "i": info["i"] + last}))
    return k_sampling.sample_euler(model, x, sigmas[-2:], extra_args=extra_args, callback=shifted, disable=True)


def dpm_solver_ksampler(steps: int) -> comfy.samplers.KSAMPLER:
    """The solver of the official DPM-Solver at `steps` steps, as a ComfyUI SAMPLER."""
    if steps >= DPM_SOLVER_FIRST_ORDER_FINAL_BELOW:
        return comfy.samplers.ksampler("dpmpp_2m")
    return comfy.samplers.KSAMPLER(sample_dpmpp_2m_first_order_final)


class DDIMKSampler(comfy.samplers.KSAMPLER):
    """diffusers' DDIM (eta 0) as a ComfyUI SAMPLER: k-diffusion's Euler step (DDIM's in ComfyUI's scaling) through
    DDIM's noise levels, from diffusers' start: plain noise at its first timestep, which is x = noise * sqrt(1 +
    sigma^2) in ComfyUI's scaling. ComfyUI scales noise so only from the largest noise level on (`max_denoise`);
    DDIM's first level lies below it (timestep 981 of 999 at 50 steps), so this sampler asks for it at
    `first_sigma` too (whatever made those sigmas: BasicScheduler's ddim_uniform at the same count starts there as
    well, and gets diffusers' start). Sigmas that start elsewhere (split for img2img) keep ComfyUI's own scaling."""

    def __init__(self, first_sigma: float):
        super().__init__(k_sampling.sample_euler)
        self.first_sigma = first_sigma

    def max_denoise(self, model_wrap, sigmas) -> bool:
        return super().max_denoise(model_wrap, sigmas) or math.isclose(float(sigmas[0]), self.first_sigma,
                                                                        rel_tol=1e-5)


def official_ksampler(scheduler: str, steps: int, sigmas: torch.Tensor) -> comfy.samplers.KSAMPLER:
    """The official `scheduler`'s solver at `steps` steps through `sigmas` (official_noise_levels), a SAMPLER."""
    return dpm_solver_ksampler(steps) if scheduler == "dpm" else DDIMKSampler(float(sigmas[0]))


def model_noise_levels(model) -> torch.Tensor:
    """The MODEL's noise level per training timestep [T], or a GenerationSettingsError for a model that does not
    sample as SD1.5 does: a table of discrete timesteps read as ComfyUI's ModelSamplingDiscrete reads it (not an
    LCM-distilled, EDM or Stable Cascade variant), and noise added as to an epsilon / v / x0 prediction model."""
    sampling = model.get_model_object("model_sampling")
    discrete, prediction = comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS
    kind = type(sampling)
    if not (isinstance(sampling, discrete) and kind.timestep is discrete.timestep and kind.sigma is discrete.sigma
            and isinstance(sampling, prediction) and kind.noise_scaling is prediction.noise_scaling
            and kind.inverse_noise_scaling is prediction.inverse_noise_scaling):
        # ComfyUI builds a model's sampling class as ModelSampling(schedule, prediction) (a patched one as
        # ModelSamplingAdvanced(...)): name those two
        generic = kind.__name__ in ("ModelSampling", "ModelSamplingAdvanced")
        parts = [base.__name__ for base in kind.__bases__] if generic else [kind.__name__]
        raise GenerationSettingsError(
            f"Kosmos-G Official Sampler needs an SD1.5-type model (discrete timesteps, noise added as SD1.5 adds it); "
            f"the connected model samples with {' + '.join(parts)}. Connect the SD1.5 checkpoint's MODEL, or use "
            "KSampler.")
    return sampling.sigmas


class KosmosGOfficialSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KosmosGOfficialSampler",
            display_name="Kosmos-G Official Sampler",
            category=CATEGORY,
            description=(
                "The official Kosmos-G demo's sampler, step for step: DPM-Solver multistep (or DDIM) on the official "
                "grid of noise levels. Connect sampler and sigmas to SamplerCustom (cfg 6 = the demo's guidance; add_noise "
                "on) or to SamplerCustomAdvanced with a CFGGuider. KSampler's dpmpp_2m with the normal scheduler is "
                "close to it, not the same. Keep the sigmas whole (no split or flip) and decode SamplerCustom's "
                "output."),
            search_aliases=["kosmos", "dpm-solver", "ddim", "official schedule", "sigmas"],
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 model to be sampled: the noise levels come from its own "
                                                "noise schedule."),
                io.Int.Input("steps", default=DEFAULT_STEPS, min=1, max=999,
                             tooltip=f"Sampling steps (official demo: {DEFAULT_STEPS})."),
                io.Combo.Input("scheduler", options=list(OFFICIAL_SAMPLER_SCHEDULERS), default="dpm", optional=True,
                               tooltip="The official demo's scheduler: dpm (DPM-Solver multistep, its default) or "
                                       "ddim (DDIM, eta 0)."),
            ],
            outputs=[
                io.Sampler.Output(display_name="sampler", tooltip="DPM-Solver++ 2M (first-order last step below "
                                                                  f"{DPM_SOLVER_FIRST_ORDER_FINAL_BELOW} steps, as "
                                                                  "the official code), or DDIM's Euler step."),
                io.Sigmas.Output(display_name="sigmas", tooltip="The official noise levels: steps + 1 values, "
                                                                "ending at the model's smallest noise level."),
            ],
        )

    @classmethod
    def execute(cls, model, steps, scheduler="dpm") -> io.NodeOutput:
        sigmas = official_noise_levels(model_noise_levels(model), steps, scheduler)
        return io.NodeOutput(official_ksampler(scheduler, steps, sigmas), sigmas)


NOISE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}  # the demo's first; the names the Loader uses


class OfficialNoise:
    """A ComfyUI NOISE (what SamplerCustomAdvanced reads: `seed`, `generate_noise(latent)`): the official demo's
    draw of every picture's noise at once, on the sampling device in `dtype` (kosmosg_core.sampling). A latent that
    names its pictures' places in a batch (`batch_index`, from Latent From Batch...) gets those rows of the draw."""

    def __init__(self, seed: int, dtype: torch.dtype):
        self.seed, self.dtype = seed, dtype

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        latent = input_latent["samples"]  # [B, 4, H/8, W/8]
        if getattr(latent, "is_nested", False):
            raise GenerationSettingsError("Kosmos-G Official Noise draws noise for SD1.5 latents; this latent holds "
                                          "several tensors (an audio / video model's): use RandomNoise.")
        device = mm.get_torch_device()
        if device.type != "cuda":
            _warn_not_the_demos_device(str(device))
        rows = input_latent.get("batch_index")
        shape = latent.shape if rows is None else (max(rows) + 1, *latent.shape[1:])
        noise = official_starting_noise(self.seed, shape, device, self.dtype)
        if rows is not None:
            noise = noise[list(rows)]
        return noise.to("cpu", torch.float32)  # where and how ComfyUI's own noise arrives; the values are the draw's


@functools.cache  # once per device
def _warn_not_the_demos_device(device: str) -> None:
    logger.warning("Kosmos-G Official Noise draws on %s: the official demo drew on a CUDA GPU, whose generator gives "
                   "other numbers, so this is not the demo's noise for the seed.", device)


class KosmosGOfficialNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KosmosGOfficialNoise",
            display_name="Kosmos-G Official Noise",
            category=CATEGORY,
            description=(
                "The official Kosmos-G demo's starting noise for a seed: one draw of every picture's noise on the "
                "sampling device (the demo's: a CUDA GPU, float16), where RandomNoise draws on the CPU in float32. "
                "Wire it into SamplerCustomAdvanced with a CFGGuider (cfg 6), Kosmos-G Official Sampler and an Empty "
                "Latent Image of 512 x 512 (batch N = the demo's number of images; picture k = row k): on an NVIDIA "
                "GPU that holds as many threads as the latent has numbers (nearly any for one picture), a seed then "
                "starts where the demo's does."),
            search_aliases=["kosmos", "official noise", "seed"],
            inputs=[
                io.Int.Input("noise_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The demo's seed."),
                io.Combo.Input("dtype", options=list(NOISE_DTYPES),
                               tooltip="The precision the noise is drawn in (the demo: fp16)."),
            ],
            outputs=[io.Noise.Output(display_name="noise", tooltip="For SamplerCustomAdvanced's noise input.")],
        )

    @classmethod
    def execute(cls, noise_seed, dtype="fp16") -> io.NodeOutput:
        return io.NodeOutput(OfficialNoise(noise_seed, NOISE_DTYPES[dtype]))
