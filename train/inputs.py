"""Training samples (docs/data-format.md) -> what the stages feed the model.

`choose_interleaved` makes the official loaders' per-sample random choices (spec section 8):
- entity-word / input-caption drop with `drop_prob` (one coin per sample: `text_dropped`),
- per entity the square crop or the masked crop with `masked_prob`,
- for InstructPix2Pix one of the 1 + `variants` seeds, uniformly.
The choices come from a generator seeded per sample, so they do not depend on batching.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from kosmosg_core.config import EOS_ID, IMAGE_PLACEHOLDER, PLACEHOLDER_PATTERN
from kosmosg_core.image_processing import preprocess_images, resize_and_center_crop
from kosmosg_core.prompt import PromptIds, build_prompt_ids, count_placeholders, pad_batch


@dataclass
class InterleavedChoice:
    """Text with `<i>` placeholders, the record fields of its images (in order) and the target field."""

    text: str
    image_fields: list[str]
    target_field: str


def choose_interleaved(meta: dict, rng: random.Random, drop_prob: float, masked_prob: float) -> InterleavedChoice:
    drop = rng.random() < drop_prob
    text = meta.get("text_dropped", meta["text"]) if drop else meta["text"]
    variants = int(meta.get("variants") or 0)
    variant = rng.randint(0, variants) if variants else 0
    prefix = f"variant_{variant}_" if variant else ""
    fields = []
    for entity in meta.get("entities", []):
        field = entity["image"]
        if entity.get("masked") and rng.random() < masked_prob:
            field = entity["masked"]
        fields.append(prefix + field)
    if count_placeholders(text) != len(fields):
        raise ValueError(f"sample text {text!r} has {count_placeholders(text)} {IMAGE_PLACEHOLDER} but "
                         f"{len(fields)} entities; the shard is malformed (rebuild it with python -m train.data).")
    weighted = next((m.group(0) for m in PLACEHOLDER_PATTERN.finditer(text) if m.group(1) is not None), None)
    if weighted:  # build_prompt_ids would drop it: the sample would train at weight 1 without a word
        raise ValueError(f"sample text {text!r} writes an image weight ({weighted}); training texts take plain "
                         f"{IMAGE_PLACEHOLDER} (a weight is an inference setting): write {IMAGE_PLACEHOLDER} there.")
    return InterleavedChoice(text=text, image_fields=fields, target_field=prefix + "target.png")


def decode_png(data: bytes, name: str) -> Image.Image:
    from train.data.crops import decode_image

    return decode_image(data, name)


def check_images_readable(record_fields: dict, field_names: list[str], key: str) -> None:
    """Cheap check in `select` (PNG chunk structure and CRCs, no decoding) so a sample with corrupt or
    truncated image bytes is skipped with a warning instead of ending the run in `collate`. Images in another
    format than the documented PNG are decoded: their `verify` passes truncated files (JPEG)."""
    for name in field_names:
        if name not in record_fields:
            raise ValueError(f"sample {key} has no field {name}; the shard does not follow docs/data-format.md.")
        try:
            with Image.open(io.BytesIO(record_fields[name])) as image:
                if image.format == "PNG":
                    image.verify()
                else:
                    image.load()
        except Exception as error:  # PIL raises many types (SyntaxError, OSError, struct.error...)
            raise ValueError(f"{name} is not a readable image ({type(error).__name__}: {error})") from error


def entity_pixels(record_fields: dict, field_names: list[str], image_size: int, key: str) -> list[torch.Tensor]:
    """Entity images of one sample (fields checked by `check_images_readable` in `select`) ->
    CLIP-normalised [3, S, S] tensors (official 'gpt' transform)."""
    if not field_names:
        return []
    images = [decode_png(record_fields[name], f"{key}.{name}") for name in field_names]
    return list(preprocess_images(images, image_size=image_size))


def target_pixels(data: bytes, resolution: int, name: str) -> torch.Tensor:
    """Diffusion target: torchvision Resize(R) (bilinear, shorter side) + CenterCrop(R), to [-1, 1]. -> [3, R, R]."""
    image = resize_and_center_crop(decode_png(data, name), resolution, Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1).copy())
    return pixels / 127.5 - 1.0


def prompt_with_eos(tokenizer, text: str, num_images: int, image_slots: int) -> PromptIds:
    """Training sequence `<s> ... </s>` (official loaders append </s>; the model input drops it)."""
    prompt = build_prompt_ids(tokenizer, text, num_images, image_slots)
    return PromptIds(prompt.ids + [EOS_ID], prompt.image_mask + [False])


def pad_rows(all_prompts: list[PromptIds], mine: list[PromptIds]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad `mine` to the longest prompt of the *global* batch (so a process's shapes, and losses that
    depend on the padded length, are those of a 1-process run). -> ids [b, T], image_mask [b, T]."""
    length = max(len(p) for p in all_prompts)
    longest = PromptIds([0] * length)
    ids, mask = pad_batch(list(mine) + [longest])
    return ids[:-1], mask[:-1]
