"""Kosmos-G Official Sampler: the official demo's DPM-Solver (or DDIM, or PNDM) as a SAMPLER + SIGMAS pair for
SamplerCustom;
Kosmos-G Official Noise: the demo's starting noise as a NOISE for SamplerCustomAdvanced.

The official demo samples with diffusers' DPM-Solver multistep (50 steps; its DDIM or PNDM on request). ComfyUI's
`dpmpp_2m` is the same solver (and its `euler` DDIM's step); what KSampler's schedulers cannot give is the official
grid of noise levels (diffusers' whole timesteps, ending at the smallest noise level, not at 0), nor, below 15 steps,
the first-order last step, nor DDIM's start from plain noise below the largest noise level, nor PNDM (ComfyUI has
no PLMS with diffusers' Heun first step). This node gives all of it
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

from ..kosmosg_core.config import DEFAULT_SCHEDULER, DEFAULT_STEPS, DPM_SOLVER_FIRST_ORDER_FINAL_BELOW
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


# PNDM's linear multistep blends (Adams-Bashforth) of the last 2, 3, 4 noise predictions, newest first
PLMS_BLENDS = {2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@torch.no_grad()
def sample_pndm(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """diffusers' PNDM as SD1.5 configures it (skip_prk_steps: pseudo linear multistep) in ComfyUI's scaling. Each
    of its steps is DDIM's (the Euler step here: x += (sigma_next - sigma) * noise) with a blend of the noise
    predictions so far: the first step is a Heun step (one model call more: diffusers runs the second timestep twice),
    then the Adams-Bashforth blends of PLMS_BLENDS. One step alone (steps = 1) is DDIM's."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    predictions = []  # the noise predictions [B, C, H, W] at the levels stepped from, newest last (4 at most)
    for i in k_sampling.trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        predictions = (predictions + [k_sampling.to_d(x, sigma, denoised)])[-4:]
        if len(predictions) == 1 and len(sigmas) > 2:  # Heun: the mean of the predictions at both ends of an Euler step
            ahead = x + (sigma_next - sigma) * predictions[0]
            ahead_denoised = model(ahead, sigma_next * s_in, **extra_args)
            noise = (predictions[0] + k_sampling.to_d(ahead, sigma_next, ahead_denoised)) / 2
        elif len(predictions) == 1:
            noise = predictions[0]
        else:
            noise = sum(weight * prediction for weight, prediction in zip(PLMS_BLENDS[len(predictions)],
                                                                          reversed(predictions)))
        x = x + (sigma_next - sigma) * noise
    return x


class PlainNoiseStartKSampler(comfy.samplers.KSAMPLER):
    """A ComfyUI SAMPLER that starts as diffusers' DDIM and PNDM do: from plain noise at the first timestep, which is
    x = noise * sqrt(1 + sigma^2) in ComfyUI's scaling. ComfyUI scales noise so only from the largest noise level on
    (`max_denoise`); DDIM's first level lies below it (timestep 981 of 999 at 50 steps), so this sampler asks for it
    at `first_sigma` too (whatever made those sigmas: BasicScheduler's ddim_uniform at the same count starts there as
    well, and gets diffusers' start). Sigmas that start elsewhere (split for img2img) keep ComfyUI's own scaling.
    `sampler_function`: k-diffusion's Euler step (diffusers' DDIM with eta 0 in ComfyUI's scaling) or sample_pndm."""

    def __init__(self, sampler_function, first_sigma: float):
        super().__init__(sampler_function)
        self.first_sigma = first_sigma

    def max_denoise(self, model_wrap, sigmas) -> bool:
        return super().max_denoise(model_wrap, sigmas) or math.isclose(float(sigmas[0]), self.first_sigma,
                                                                        rel_tol=1e-5)


def official_ksampler(scheduler: str, steps: int, sigmas: torch.Tensor) -> comfy.samplers.KSAMPLER:
    """The official `scheduler`'s solver at `steps` steps through `sigmas` (official_noise_levels), a SAMPLER."""
    if scheduler == "dpm":
        return dpm_solver_ksampler(steps)
    return PlainNoiseStartKSampler(sample_pndm if scheduler == "pndm" else k_sampling.sample_euler, float(sigmas[0]))


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
                "The official Kosmos-G demo's sampler, step for step: DPM-Solver multistep (or DDIM, or PNDM) on the "
                "official grid of noise levels. Connect sampler and sigmas to SamplerCustom (cfg 6 = the demo's "
                "guidance; add_noise on) or to SamplerCustomAdvanced with a CFGGuider. KSampler's dpmpp_2m with the "
                "normal scheduler is close to it, not the same. Keep the sigmas whole (no split or flip) and decode SamplerCustom's "
                "output."),
            search_aliases=["kosmos", "dpm-solver", "ddim", "pndm", "plms", "official schedule", "sigmas"],
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 model to be sampled: the noise levels come from its own "
                                                "noise schedule."),
                io.Int.Input("steps", default=DEFAULT_STEPS, min=1, max=999,
                             tooltip=f"Sampling steps (official demo: {DEFAULT_STEPS})."),
                io.Combo.Input("scheduler", options=list(OFFICIAL_SAMPLER_SCHEDULERS), default=DEFAULT_SCHEDULER, optional=True,
                               tooltip="The official demo's scheduler: dpm (DPM-Solver multistep, its default), "
                                       "ddim (DDIM, eta 0) or pndm (PNDM as SD1.5 sets it: PLMS, one model call "
                                       "more than steps)."),
            ],
            outputs=[
                io.Sampler.Output(display_name="sampler", tooltip="DPM-Solver++ 2M (first-order last step below "
                                                                  f"{DPM_SOLVER_FIRST_ORDER_FINAL_BELOW} steps, as "
                                                                  "the official code), DDIM's Euler step, or "
                                                                  "PNDM's multistep."),
                io.Sigmas.Output(display_name="sigmas", tooltip="The official noise levels: steps + 1 values, "
                                                                "ending at the model's smallest noise level."),
            ],
        )

    @classmethod
    def execute(cls, model, steps, scheduler=DEFAULT_SCHEDULER) -> io.NodeOutput:
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
