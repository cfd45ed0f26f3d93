"""Headless generation: Kosmos-G conditioning drives a local SD1.5 model through diffusers.

The U-Net is unchanged SD1.5: `prompt_embeds` / `negative_prompt_embeds` replace the CLIP text
encoder (which is never loaded). Defaults follow the official demo: DPM-Solver multistep,
50 steps, guidance 6.0, negative = the official unconditional encoding of `<s>`.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import __version__
from .config import (DEFAULT_GUIDANCE_SCALE, DEFAULT_SCHEDULER, DEFAULT_STEPS, DTYPE_NAMES, MAX_IMAGE_SIDE,
                     MAX_NUM_IMAGES, MAX_STEPS, NOISE_MODES, PNG_SETTINGS_KEY, SCHEDULERS)
from .devices import resolve_device, resolve_dtype
from .errors import GenerationSettingsError, NonFiniteEncodingError, PromptError, first_line
from .files import check_output_folder, content_fingerprint, save_image
from .image_processing import split_images
from .official_sd15 import check_sd15_parts
from .pipeline import KosmosGPipeline, image_weight_list, read_prompt_images
from .prompt import check_negative_prompt, check_text, combine_image_weights, placeholder_mismatch
from .sampling import official_noise_generator
from .sd15 import check_scheduler_settings, check_sd15_paths, check_sd15_width, load_sd15, native_size

logger = logging.getLogger(__name__)

def generate_images(checkpoint, sd_model, prompt: str, images=(), tokenizer_dir=None, negative_prompt: str = "",
                    out_dir: Path = Path("outputs"), steps: int = DEFAULT_STEPS,
                    guidance_scale: float = DEFAULT_GUIDANCE_SCALE, scheduler: str = DEFAULT_SCHEDULER, seed: int = 0,
                    num_images: int = 1, height: int | None = None, width: int | None = None, dtype="float32", device="cpu",
                    sd_config_dir=None, show_progress: bool = False, noise: str = "per-image",
                    image_weights=None, record_settings: bool = True, disk_cache=None) -> list[Path]:
    """Encode the prompt with Kosmos-G, sample SD1.5, write PNGs `kosmosg_<seed>_<k>.png` -> their paths
    (`kosmosg_<seed>_<k>_<n>.png` where that name is taken: earlier results are never overwritten).
    sd_model: an SD1.5 file or folder (`load_sd15`), or None: the U-Net and VAE an official `checkpoint` stores.
    images: one per `<i>`, paths or anything `to_pil_images` reads; image_weights: None (1.0 each) or one per image,
    as `KosmosGPipeline.encode` takes them; height / width None: the SD model's own size
    (`native_size`); show_progress: diffusers' progress bar over the sampling steps (on stderr).
    noise "per-image": image k starts from the noise of seed + k (`image_generators`), it is image 0 of a run with
    that seed; "official": the official demo's noise (`official_noise_generator`). record_settings: each PNG
    carries `settings_record` as JSON in its text chunk PNG_SETTINGS_KEY (prompt, image file names...).
    disk_cache: a `DiskCache` the encodings are read from and kept in (the same prompt in a later run: no encode)."""
    check_generation_settings(steps, guidance_scale, seed, num_images, height, width, scheduler)
    if noise not in NOISE_MODES:
        raise GenerationSettingsError(f"noise {noise!r} is not known: use one of {', '.join(NOISE_MODES)}.")
    out_dir = check_output_folder(out_dir, "The output folder")  # all checked before the models load
    if check_sd15_paths(sd_model, sd_config_dir) is None:  # the official checkpoint's own U-Net and VAE
        check_sd15_parts(checkpoint)
    pictures = read_prompt_images(prompt, images, image_weights)
    negative_prompt = "" if negative_prompt is None else negative_prompt  # as encode_unconditional takes it
    check_negative_prompt(negative_prompt)
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    check_scheduler_settings(sd_model, sd_config_dir, scheduler, steps)  # the settings file's, before the models load
    guided = guidance_scale > 1  # as diffusers: at 1 no unconditional pass
    if not guided and negative_prompt:
        logger.warning("guidance_scale %s: no guidance, so the negative prompt %r is not used (give a guidance_scale "
                       "above 1, e.g. the official %s)", guidance_scale, negative_prompt, DEFAULT_GUIDANCE_SCALE)
    record = None if not record_settings else settings_record(
        checkpoint, sd_model, prompt, images, pictures, image_weights, negative_prompt, sd_config_dir, seed=seed,
        noise=noise,
        num_images=num_images, steps=steps, guidance_scale=guidance_scale, scheduler=scheduler,
        dtype=str(dtype).removeprefix("torch."), device=str(device), requested_width=width, requested_height=height)
    # before the models load: a device without a random generator of its own fails here, not minutes later
    generators = official_noise_generator(seed, device) if noise == "official" else image_generators(seed, num_images)
    # lazy: its weights are read only if something is computed (not when disk_cache holds both encodings)
    encoder = KosmosGPipeline.from_checkpoint(checkpoint, tokenizer_dir=tokenizer_dir, dtype=dtype, device=device,
                                              lazy=True)
    cond = encoder.encode(prompt, pictures, image_weights=image_weights, disk_cache=disk_cache)  # [1, 77, C]
    # [1, 77, C]; none at guidance 1 (diffusers samples the prompt alone there)
    uncond = encoder.encode_unconditional(negative_prompt, disk_cache=disk_cache) if guided else None
    check_sd15_width(encoder.context_dim, checkpoint)
    del encoder  # free the encoder before the U-Net runs
    sd = load_sd15(sd_model, dtype, device, scheduler, sd_config_dir, steps, official_checkpoint=checkpoint)
    sd.set_progress_bar_config(disable=not show_progress)
    paths = []  # the folder is made with the first picture: a run that keeps none leaves none

    def save(k: int, image) -> None:  # as each picture is sampled: an interrupted run keeps the ones made
        text = None
        if record is not None:  # the JSON, ASCII only: any path's or prompt's characters survive as escapes
            text = {PNG_SETTINGS_KEY: json.dumps({**record, "image_index": k, "width": image.width,
                                                  "height": image.height})}
        paths.append(save_new_image(image, out_dir, f"kosmosg_{seed}_{k}", text))

    sample_sd15(sd, sd_model or checkpoint, cond, uncond, generators, steps=steps, guidance_scale=guidance_scale,
                num_images=num_images, height=height, width=width,
                one_by_one=noise == "per-image",  # so each picture is remade bit for bit from its seed
                on_picture=save)
    return paths


# generate_images' own defaults, by argument name (what `generate` falls back to without a flag or a --like record)
GENERATE_IMAGES_DEFAULTS = {name: parameter.default for name, parameter in
                            inspect.signature(generate_images).parameters.items()
                            if parameter.default is not inspect.Parameter.empty}


def image_digests(pictures: list) -> list[str]:
    """SHA-256 of each picture's RGB pixels (as `read_prompt_images` gives them): a record's `image_sha256`."""
    return [hashlib.sha256(picture.tobytes()).hexdigest() for picture in pictures]


def settings_record(checkpoint, sd_model, prompt: str, images, pictures: list, image_weights, negative_prompt: str,
                    sd_config_dir=None, **settings) -> dict:
    """What a PNG of `generate_images` records (PNG_SETTINGS_KEY), less its own index and size: the arguments that
    make it again (prompt and negative as given, `image_weights` one per image as `encode` reads them, 1.0 = none
    given; images, checkpoint and SD model by file name only, never a folder; the rest as passed), plus
    `effective_image_weights` (each image's weight times its `<i:W>`), `image_sha256` (of each image's RGB pixels as
    the pipeline reads them: EXIF orientation applied, 8 bits per channel) and `image_sizes` ([width, height]: the
    pixels alone do not tell 2x1 from 1x2), the models' `files.content_fingerprint`s and the
    package version."""
    weights = image_weight_list(prompt, images, image_weights)
    given = split_images(images) if pictures else []
    return dict(prompt=prompt, negative_prompt=negative_prompt,
                images=[Path(i).name if isinstance(i, (str, os.PathLike)) else None for i in given],
                image_sha256=image_digests(pictures), image_sizes=[list(picture.size) for picture in pictures],
                image_weights=weights,
                effective_image_weights=combine_image_weights(prompt, weights), checkpoint=Path(checkpoint).name,
                sd_model=None if sd_model is None else Path(sd_model).name,
                checkpoint_fingerprint=content_fingerprint(checkpoint),
                sd_model_fingerprint=None if sd_model is None else content_fingerprint(sd_model),
                # the SD1.5 config folder a single file was built from (its scheduler settings make other pictures)
                sd_config=None if sd_config_dir is None else Path(sd_config_dir).name,
                sd_config_fingerprint=None if sd_config_dir is None else content_fingerprint(sd_config_dir), **settings,
                kosmosg_core_version=__version__)


# A record's settings that `generate_images` takes as they are (the files are named by the user again; seed and
# num_images depend on the noise mode, the size on whether it was asked for: `settings_like`)
RECORD_SETTINGS = ("prompt", "negative_prompt", "image_weights", "noise", "steps", "guidance_scale", "scheduler",
                   "dtype", "device")
REQUIRED_RECORD_KEYS = (*RECORD_SETTINGS, "seed", "num_images", "image_index", "images", "image_sha256", "width", "height")


def read_settings_record(path) -> dict:
    """The settings a PNG of `generate_images` records (JSON in its text chunk PNG_SETTINGS_KEY); a file without
    one, or with a damaged one, is a GenerationSettingsError naming it."""
    from PIL import Image, UnidentifiedImageError

    damaged = f"--like {path}: its '{PNG_SETTINGS_KEY}' record is damaged or not generate's"
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(PNG_SETTINGS_KEY)
    # a hostile file: a text chunk that inflates past PIL's limit (ValueError), a size PIL calls a decompression bomb
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise GenerationSettingsError(f"--like {path}: cannot read it as a PNG ({shown(first_line(e))}); give a PNG "
                                      "written by generate.") from e
    if text is None:
        raise GenerationSettingsError(f"--like {path}: it holds no record of its settings (PNG text chunk "
                                      f"'{PNG_SETTINGS_KEY}'); generate writes one unless told --no-record.")
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
        raise GenerationSettingsError(f"{damaged} (not valid JSON: {shown(first_line(e))}); give the settings as "
                                      "arguments instead.") from None
    missing = [key for key in REQUIRED_RECORD_KEYS if key not in record] if isinstance(record, dict) else ["all"]
    if missing:
        raise GenerationSettingsError(f"{damaged} (missing: {', '.join(missing)}); give the settings as arguments "
                                      "instead.")
    problem = settings_record_problem(record)
    if problem:
        raise GenerationSettingsError(f"{damaged} ({problem}); give the settings as arguments instead.")
    return record


def shown(value, limit: int = 80) -> str:
    """An untrusted value for a message: text as it is where printable, else its repr (escape codes and new lines
    escaped), at most `limit` characters."""
    text = value if isinstance(value, str) and value.isprintable() else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def settings_record_problem(record: dict) -> str | None:
    """What in a record (all REQUIRED_RECORD_KEYS present) is not what `generate_images` writes, or None: a file's record
    is untrusted input, checked as the arguments it gives are (so an error later cannot blame a flag not given)."""
    def is_text(value):
        return isinstance(value, str)

    def is_int(value):
        return isinstance(value, int) and not isinstance(value, bool)

    def is_number(value):  # an int too big for a float (10**400) is not one
        try:
            return (is_int(value) or isinstance(value, float)) and math.isfinite(float(value))
        except OverflowError:
            return False

    count = len(record["images"]) if isinstance(record["images"], list) else -1
    checks = [
        ("prompt", is_text), ("negative_prompt", is_text), ("device", is_text),
        ("dtype", lambda v: v in DTYPE_NAMES), ("noise", lambda v: v in NOISE_MODES),
        ("scheduler", lambda v: is_text(v) and v in SCHEDULERS),
        ("num_images", is_int), ("guidance_scale", is_number),  # before image_index; an overflowing guidance
        ("images", lambda v: isinstance(v, list) and all(n is None or is_text(n) for n in v)),
        ("image_sha256", lambda v: isinstance(v, list) and len(v) == count and all(map(is_text, v))),
        ("image_sizes", lambda v: isinstance(v, list) and len(v) == count and all(  # records before it: none
            isinstance(size, list) and len(size) == 2 and all(map(is_int, size)) for size in v)),
        ("image_weights", lambda v: isinstance(v, list) and len(v) == count and all(map(is_number, v))),
        ("image_index", lambda v: is_int(v) and 0 <= v < record["num_images"]),
        ("checkpoint_fingerprint", lambda v: v is None or is_text(v)),  # records before them: names only
        ("sd_model_fingerprint", lambda v: v is None or is_text(v)),
        ("sd_config", lambda v: v is None or is_text(v)), ("sd_config_fingerprint", lambda v: v is None or is_text(v)),
        ("requested_width", lambda v: v is None or is_int(v)),
        ("requested_height", lambda v: v is None or is_int(v)),
        # records from before requested_width / _height: the picture's own size is asked for
        ("width", lambda v: "requested_width" in record or is_int(v)),
        ("height", lambda v: "requested_height" in record or is_int(v)),
    ]
    for key, ok in checks:
        if key in record and not ok(record[key]):
            return f"{key} is {shown(repr(record[key]))}"
    try:
        # a guidance below 1 (accepted by earlier versions, sampled as 1) is refused when the run's settings are known,
        # after the flags: --guidance-scale may replace it
        guidance = max(record["guidance_scale"], 1.0)
        check_generation_settings(record["steps"], guidance, record["seed"], record["num_images"],
                                  record.get("requested_height", record.get("height")),
                                  record.get("requested_width", record.get("width")), record["scheduler"])
        check_text(record["prompt"], "prompt")
        check_negative_prompt(record["negative_prompt"])
        mismatch = placeholder_mismatch(record["prompt"], count)
        if mismatch:
            raise PromptError(mismatch)
        combine_image_weights(record["prompt"], record["image_weights"])  # each in range, and `<i:W>` written right
    except (GenerationSettingsError, PromptError) as e:
        return shown(str(e).rstrip("."), 300)
    return None


def settings_like(record: dict) -> dict:
    """A record -> the `generate_images` arguments that make its picture again, the files aside: the recorded
    settings; per-image noise: the picture's own seed (seed + image_index) and one picture; official noise (one
    draw for all the pictures, so each depends on the count): the run's seed and count (the picture is number
    image_index of them)."""
    settings = {name: record[name] for name in RECORD_SETTINGS}
    if settings["guidance_scale"] < 1:  # earlier versions took it and sampled as at 1 (diffusers guides above 1)
        logger.warning("the record's guidance_scale %s was sampled as 1 (no guidance): made again with 1",
                       settings["guidance_scale"])
        settings["guidance_scale"] = 1.0
    # the size asked for (None: the SD model's own, whichever model is given now); records before it: the picture's
    settings.update(width=record.get("requested_width", record["width"]),
                    height=record.get("requested_height", record["height"]))
    if record["noise"] == "per-image":
        settings.update(seed=record["seed"] + record["image_index"], num_images=1)
    else:
        settings.update(seed=record["seed"], num_images=record["num_images"])
    return settings


def sample_sd15(sd, sd_model, cond: torch.Tensor, uncond: torch.Tensor | None, generators, *, steps: int,
                guidance_scale: float, num_images: int, height: int | None, width: int | None,
                one_by_one: bool = False, on_picture: Callable[[int, Any], None] | None = None) -> list:
    """Kosmos-G conditions [B, 77, 768] (+ the unconditional [B, 77, 768]; None at guidance_scale 1) through
    `load_sd15`'s pipeline -> the B x num_images PIL images, prompt-major, height x width (None: `native_size`);
    images that came out NaN are refused (diffusers turns them into black PNGs without a word). on_picture(k, image):
    called with each picture as soon as it is sampled (and checked), e.g. to save it.

    one_by_one: sample each picture alone (a batch of one, `generators` one per picture): its pixels then do not
    depend on the batch it was asked in (a batch's matmuls round differently, a few pixels 1 apart); generate does
    so for per-image noise, so that a picture is made again bit for bit from its own seed. Batched (default), the
    GPU is used better."""
    if uncond is None and guidance_scale > 1:  # diffusers would encode "" with the text encoder the pipeline lacks
        raise ValueError(f"guidance_scale {guidance_scale} needs the unconditional encoding (uncond); give it.")
    native = native_size(sd)
    height, width = (native if side is None else side for side in (height, width))
    if any(not native / 2 < side < native * 2 for side in (height, width)):  # e.g. the 64 px nano model at 512
        _warn_far_from_native_size(str(sd_model), width, height, native)
    settings = dict(num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
                    output_type="np")  # floats: NaN shows, unlike in a PNG
    # (conditions, unconditional ones, pictures per prompt, generators) of each sampling call
    if one_by_one:  # prompt-major, as diffusers orders
        calls = [(cond[p:p + 1], None if uncond is None else uncond[p:p + 1], 1, [generators[p * num_images + k]])
                 for p in range(cond.shape[0]) for k in range(num_images)]
    else:
        calls = [(cond, uncond, num_images, generators)]
    pictures = []
    for prompt_embeds, negative_embeds, per_prompt, call_generators in calls:
        images = sd(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                    num_images_per_prompt=per_prompt, generator=call_generators, **settings).images
        if not np.isfinite(images).all():
            kept = f"the {len(pictures)} sampled before were kept" if pictures and on_picture else "none was kept"
            raise NonFiniteEncodingError(f"The images sampled from {sd_model} came out NaN "
                                         f"({str(sd.dtype).split('.')[-1]}, guidance_scale {guidance_scale}): {kept}; "
                                         f"use float32 and a guidance_scale near the official "
                                         f"{DEFAULT_GUIDANCE_SCALE}. If they still come out NaN, the SD model's weights "
                                         "are damaged: fetch it again.")
        for image in sd.numpy_to_pil(images):
            if on_picture is not None:
                on_picture(len(pictures), image)
            pictures.append(image)
    return pictures


@functools.cache  # once per model and size: train.eval samples batch after batch
def _warn_far_from_native_size(sd_model: str, width: int, height: int, native: int) -> None:
    logger.warning("sampling %s at %dx%d px, far from the %d px it was made for: expect poor pictures (give "
                   "height and width %d).", sd_model, width, height, native, native)


def save_new_image(image, folder: Path, stem: str, text: dict[str, str] | None = None) -> Path:
    """`image` as `folder/<stem>.png`, or `<stem>_<n>.png` with the first n whose name is free -> its path. Atomic,
    and a name is taken in one step (`save_image(exclusive=True)`): runs writing into one folder at once never
    overwrite each other's pictures, nor any earlier one."""
    n = 0
    while True:
        path = folder / (f"{stem}.png" if n == 0 else f"{stem}_{n}.png")
        if not os.path.lexists(path):
            try:
                return save_image(image, path, text, exclusive=True)
            except FileExistsError:
                if not os.path.lexists(path):  # not the name taken (e.g. the folder is a file): not retried
                    raise
        n += 1  # another run took the name meanwhile


def image_generators(seed: int, num_images: int, num_prompts: int = 1) -> list[torch.Generator]:
    """diffusers' per-image generators, prompt-major: image k of every prompt starts from the noise of seed + k,
    so a picture's noise does not depend on how many were asked for or on the batch it was made in (its pixels do
    not either when sampled `one_by_one`)."""
    return [torch.Generator("cpu").manual_seed(seed + k) for _ in range(num_prompts) for k in range(num_images)]


def check_scheduler(scheduler: str) -> None:
    if scheduler not in SCHEDULERS:
        raise GenerationSettingsError(f"scheduler {scheduler!r} is not known: use one of {', '.join(SCHEDULERS)}.")


def check_generation_settings(steps, guidance_scale, seed, num_images, height, width,
                              scheduler: str = DEFAULT_SCHEDULER) -> None:
    """Sampling settings in range, or a GenerationSettingsError naming the setting and its range."""
    check_scheduler(scheduler)
    def whole(value, name, low, high=None):
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            limit = f"between {low} and {high}" if high is not None else f">= {low}"
            raise GenerationSettingsError(f"{name} must be a whole number {limit}, got {value!r}.")

    whole(steps, "steps", 1, MAX_STEPS)
    whole(num_images, "num_images", 1, MAX_NUM_IMAGES)
    whole(seed, "seed", 0, 2**64 - num_images)  # image k uses seed + k: torch.Generator.manual_seed's range
    for name, value in (("height", height), ("width", width)):
        if value is None:  # the SD model's own size
            continue
        whole(value, name, 8, MAX_IMAGE_SIDE)
        if value % 8:
            raise GenerationSettingsError(f"{name} must be a multiple of 8 (the VAE's scale), got {value}; e.g. "
                                          f"{value - value % 8 or 8} or {value - value % 8 + 8}.")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
        raise GenerationSettingsError(f"guidance_scale must be a finite number (official demo: "
                                      f"{DEFAULT_GUIDANCE_SCALE}), got {guidance_scale!r}.")
    if guidance_scale < 1:  # diffusers (and the official demo) guide only above 1: below, it samples as at 1
        raise GenerationSettingsError(f"guidance_scale must be 1 (no guidance: the negative prompt is not used) or "
                                      f"above (official demo: {DEFAULT_GUIDANCE_SCALE}), got {guidance_scale!r}; below "
                                      "1 the sampler applies no guidance either.")
