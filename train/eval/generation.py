"""Batched Kosmos-G + SD1.5 sampling for the benchmarks: both models loaded once, many prompts.

Seeds: image k of every prompt starts from the noise of `torch.Generator("cpu").manual_seed(seed + k)`
(`kosmosg_core.generate.image_generators`, as `python -m kosmosg_core generate`), so an image's noise does
not depend on the batch it was generated in (resumed or re-batched runs give the same pictures up to the last
bits: prompts and pictures are batched here, for speed, and a batch's matmuls round differently).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from kosmosg_core.config import DEFAULT_SCHEDULER, SCHEDULER_SETTINGS

logger = logging.getLogger(__name__)

IMAGE_SIDES = ("height", "width")


def folder_settings(cfg, names: Sequence[str]) -> dict:
    """What makes a generated folder's images, for `train.common.folder_settings` (a rerun keeps the images there,
    so it must use the same): `cfg`'s fields `names`, and as `scheduler_settings` what the sampler sets over the
    scheduler's config (kosmosg_core.config.SCHEDULER_SETTINGS). DPM-Solver's final step changed with those (see
    there), so a folder sampled before, which has no such record, is refused rather than filled up with other
    pictures; DDIM and PNDM have none and sample as before, so their folders from before still resume."""
    settings = {name: getattr(cfg, name) for name in names}
    if SCHEDULER_SETTINGS.get(cfg.scheduler):
        settings["scheduler_settings"] = dict(SCHEDULER_SETTINGS[cfg.scheduler])
    return settings


def check_generated_folder(out, settings: dict) -> None:
    """Before the models load: refuse, by name, `settings` other than those that made `out`'s images, but for a
    height / width left to the SD model (None), whose size is known only once it is loaded
    (`record_generated_folder`)."""
    from train.common.folder_settings import check_folder_settings

    check_folder_settings(out, settings, may_change=tuple(side for side in IMAGE_SIDES if settings[side] is None))


def record_generated_folder(out, settings: dict, sampler: "KosmosGSampler") -> dict:
    """Once the models are loaded, before the first image is written: `settings` with the size the sampler samples
    at (for None: the SD model's own), checked against `out`'s record and recorded there -> those settings. Real
    sizes on both sides: a folder made at 512 px resumes with the default size of SD1.5 (512), or the other way
    round."""
    from train.common.folder_settings import check_folder_settings, record_folder_settings

    settings = {**settings, **{side: sampler.native_size for side in IMAGE_SIDES if settings[side] is None}}
    check_folder_settings(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    record_folder_settings(out, settings)
    return settings


@dataclass
class SamplingSettings:
    steps: int
    guidance_scale: float
    num_images: int
    seed: int
    height: int | None = None  # None: the SD model's own size (`kosmosg_core.sd15.native_size`)
    width: int | None = None
    negative_prompt: str = ""

    def __post_init__(self):
        from kosmosg_core.generate import check_generation_settings

        check_generation_settings(self.steps, self.guidance_scale, self.seed, self.num_images, self.height, self.width)


class KosmosGSampler:
    """Kosmos-G conditioning -> a local SD1.5 (diffusers folder or single file), prompt batches -> PIL images."""

    def __init__(self, checkpoint: str, sd_model: str, tokenizer: str = "", scheduler: str = DEFAULT_SCHEDULER,
                 dtype: str = "float32", device: str = "auto"):
        from kosmosg_core.devices import resolve_device, resolve_dtype
        from kosmosg_core.generate import check_scheduler
        from kosmosg_core.sd15 import check_sd15_width, load_sd15
        from kosmosg_core.pipeline import KosmosGPipeline

        if not checkpoint:
            raise ValueError("--checkpoint is required to generate: give a Kosmos-G pack .safetensors "
                             "(or an official .pt).")
        if not sd_model:
            raise ValueError("--sd-model is required to generate: give a local SD1.5 diffusers folder or single file.")
        check_scheduler(scheduler)
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.encoder = KosmosGPipeline.from_checkpoint(checkpoint, tokenizer_dir=tokenizer or None, dtype=self.dtype,
                                                       device=self.device)
        check_sd15_width(self.encoder.context_dim, checkpoint)
        self.sd = load_sd15(sd_model, self.dtype, self.device, scheduler)
        self.sd_model, self.scheduler = sd_model, scheduler
        self._steps_checked: set[int] = set()

    @property
    def native_size(self) -> int:
        """The side in pixels it samples at when given none (height / width None): the SD model's own."""
        from kosmosg_core.sd15 import native_size

        return native_size(self.sd)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], images: Sequence[Sequence], settings: SamplingSettings
                 ) -> list[list[Image.Image]]:
        """B prompts (with `<i>` per image) + B image lists -> B lists of `num_images` PIL images."""
        from kosmosg_core.generate import image_generators, sample_sd15
        from kosmosg_core.sd15 import check_scheduler_steps

        if settings.steps not in self._steps_checked:  # e.g. DDIM at 1000 steps: refused, not a traceback mid-run
            check_scheduler_steps(self.sd.scheduler, self.scheduler, settings.steps, self.sd_model)
            self._steps_checked.add(settings.steps)
        cond = self.encoder.encode(list(prompts), [list(x) for x in images])  # [B, 77, 768]
        # cached; none at guidance 1 (diffusers samples the prompt alone there)
        uncond = self.encoder.encode_unconditional(settings.negative_prompt, batch_size=len(prompts)) \
            if settings.guidance_scale > 1 else None
        generators = image_generators(settings.seed, settings.num_images, num_prompts=len(prompts))
        sampled = sample_sd15(self.sd, self.sd_model, cond, uncond, generators, steps=settings.steps,
                              guidance_scale=settings.guidance_scale, num_images=settings.num_images,
                              height=settings.height, width=settings.width)
        n = settings.num_images  # diffusers orders them prompt 0 image 0..n-1, prompt 1 ...
        return [sampled[i * n:(i + 1) * n] for i in range(len(prompts))]
