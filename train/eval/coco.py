r"""Text-only generation from COCO captions with the official FID settings (then `train.eval fid`).

    python -m train.eval generate-coco --captions coco/annotations/captions_val2014.json --out coco_out/ \
        --checkpoint kosmosg.safetensors --sd-model sd15/
    python -m train.eval fid --generated coco_out/ --real coco/val2014/ --inception inception_v3_google.pth

--captions: a COCO captions file ({"annotations": [{"id", "image_id", "caption"}, ...]}) or a JSON list
of strings. Official eval: 30,000 captions drawn with Python's `random.Random(seed).sample` (the same
draw as `random.seed(0); random.sample(annotations, 30000)`), DDIM, 250 steps, guidance 3.0, one
image per caption, seed 0, empty negative prompt. Image i is written as `OUT/{i:05d}.png`
(`{i:05d}_{k}.png` with several per caption); `OUT/captions.json` records which caption made it.
Existing images are kept, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .cli import image_side_field, parse_eval_config

logger = logging.getLogger(__name__)

DESCRIPTION = "generate images from COCO captions with the official FID settings (DDIM 250, scale 3.0)"


@dataclass
class CocoConfig:
    captions: str = field(default="", metadata={"help": "COCO captions JSON (annotations[].caption) or a JSON list "
                                                        "of strings"})
    out: str = field(default="", metadata={"help": "folder for the generated images"})
    checkpoint: str = field(default="", metadata={"help": "Kosmos-G checkpoint (.safetensors or official .pt)"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer folder; empty = inside / beside the checkpoint"})
    sd_model: str = field(default="", metadata={"help": "local SD1.5: diffusers folder or single .safetensors"})
    num_captions: int = field(default=30000, metadata={"min": 0, "help": "captions drawn at random with --seed (0 = all, in "
                                                                 "file order)"})
    scheduler: str = field(default="ddim", metadata={"help": "dpm | ddim | pndm (official COCO: ddim)"})
    steps: int = field(default=250, metadata={"min": 1, "help": "sampling steps (official COCO: 250)"})
    guidance_scale: float = field(default=3.0, metadata={"help": "classifier-free guidance (official: 3.0)"})
    num_images: int = field(default=1, metadata={"min": 1, "help": "images per caption (official: 1)"})
    seed: int = field(default=0, metadata={"min": 0, "help": "caption draw seed; image k of every caption uses seed + k"})
    height: int | None = image_side_field("height")
    width: int | None = image_side_field("width")
    negative_prompt: str = field(default="", metadata={"help": "negative prompt (official: empty)"})
    batch_size: int = field(default=16, metadata={"min": 1, "help": "captions per sampling call"})
    dtype: str = field(default="float32", metadata={"help": "float32 | float16 | bfloat16"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available) | cpu | cuda | cuda:N"})


def read_captions(path: str) -> list[dict]:
    """-> [{"caption", "id", "image_id"}] in file order."""
    if not path or not Path(path).is_file():
        raise ValueError(f"--captions {path!r}: no such file; give COCO's captions_val2014.json or a JSON list of "
                         "strings.")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"--captions {path}: not valid JSON ({e}).") from e
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        entries = [{"caption": a["caption"], "id": a.get("id"), "image_id": a.get("image_id")}
                   for a in data["annotations"] if isinstance(a, dict) and isinstance(a.get("caption"), str)]
    elif isinstance(data, list) and all(isinstance(c, str) for c in data):
        entries = [{"caption": c, "id": i, "image_id": None} for i, c in enumerate(data)]
    else:
        raise ValueError(f"--captions {path}: expected {{'annotations': [{{'caption': ...}}]}} or a list of strings.")
    if not entries:
        raise ValueError(f"--captions {path}: holds no captions.")
    return entries


def select_captions(entries: list[dict], num_captions: int, seed: int) -> list[dict]:
    if not num_captions or num_captions >= len(entries):
        if num_captions > len(entries):
            logger.warning("--num-captions %d > %d captions in the file: using all", num_captions, len(entries))
        return entries
    return random.Random(seed).sample(entries, num_captions)


def image_name(index: int, k: int, num_images: int) -> str:
    return f"{index:05d}.png" if num_images == 1 else f"{index:05d}_{k}.png"


# What makes the images (with the scheduler's settings: generation.folder_settings): a rerun into the same --out (it
# keeps the images there) must use the same.
GENERATION_SETTINGS = ("captions", "num_captions", "seed", "checkpoint", "tokenizer", "sd_model", "scheduler", "steps",
                       "guidance_scale", "num_images", "height", "width", "negative_prompt", "dtype")


def run(cfg: CocoConfig) -> dict:
    from kosmosg_core.files import check_output_folder, save_image, write_json

    from .generation import (KosmosGSampler, SamplingSettings, check_generated_folder, folder_settings,
                             record_generated_folder)

    if not cfg.out:
        raise ValueError("--out is required: the folder for the generated images.")
    out = check_output_folder(cfg.out, "--out")
    generation = folder_settings(cfg, GENERATION_SETTINGS)
    check_generated_folder(out, generation)
    chosen = select_captions(read_captions(cfg.captions), cfg.num_captions, cfg.seed)
    manifest = {image_name(i, k, cfg.num_images): entry
                for i, entry in enumerate(chosen) for k in range(cfg.num_images)}
    todo = [i for i in range(len(chosen))
            if not all((out / image_name(i, k, cfg.num_images)).exists() for k in range(cfg.num_images))]
    logger.info("generate-coco: %d of %d captions to generate", len(todo), len(chosen))
    sampler = None
    if todo:  # the models are checked before anything is written
        sampler = KosmosGSampler(cfg.checkpoint, cfg.sd_model, cfg.tokenizer, cfg.scheduler, cfg.dtype, cfg.device)
        generation = record_generated_folder(out, generation, sampler)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "captions.json", manifest)
    if sampler is not None:
        settings = SamplingSettings(cfg.steps, cfg.guidance_scale, cfg.num_images, cfg.seed, generation["height"],
                                    generation["width"], cfg.negative_prompt)
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start:start + cfg.batch_size]
            results = sampler([chosen[i]["caption"] for i in batch], [[] for _ in batch], settings)
            for i, images in zip(batch, results):
                for k, image in enumerate(images):
                    save_image(image, out / image_name(i, k, cfg.num_images))  # atomic: reruns skip existing files
            logger.info("generate-coco: %d / %d captions done", min(start + cfg.batch_size, len(todo)), len(todo))
    return {"out": str(out), "captions": len(chosen), "generated_this_run": len(todo) * cfg.num_images,
            "config": asdict(cfg)}


def main(argv=None) -> dict:
    return run(parse_eval_config(CocoConfig, argv, "generate-coco", __doc__))
