"""Builders of the three sample kinds (the schema is documented in docs/data-format.md).

Every sample: `__key__`, `json` (meta below), `target.png` (the diffusion target), and per entity
`entity_{k}.png` (+ `entity_{k}_masked.png` for segmented entities). Meta keys:
  format, version, kind ("laion" | "instructpix2pix" | "openimage"), caption, instruction,
  text (interleaved, `<i>` where entity images go), text_dropped, drop_spans, entities
  ([{"name", "image", "masked"}]), variants (extra InstructPix2Pix seeds), origin.
"""

from __future__ import annotations

from PIL import Image

from kosmosg_core.config import IMAGE_PLACEHOLDER

from .crops import png_bytes
from .entities import Layout
from .shards import FORMAT_NAME, FORMAT_VERSION, Sample


def _meta(kind: str, caption: str, text: str, text_dropped: str, drop_spans: list, entities: list,
          origin: str, instruction: str | None = None, variants: int = 0) -> dict:
    return {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": kind,
        "caption": caption, "instruction": instruction,
        "text": text, "text_dropped": text_dropped, "drop_spans": drop_spans,
        "entities": entities, "variants": variants, "origin": origin,
    }


def laion_sample(key: str, caption: str, target: bytes | Image.Image, origin: str = "") -> Sample:
    """Text-to-image pair: `<s> caption </s>`, no image input (official LAION docs)."""
    target_png = target if isinstance(target, bytes) else png_bytes(target)
    return Sample(key, _meta("laion", caption, caption, caption, [], [], origin), {"target.png": target_png})


def ip2p_sample(key: str, input_caption: str, instruction: str,
                pairs: list[tuple[bytes | Image.Image, bytes | Image.Image]], origin: str = "") -> Sample:
    """Editing triplet: `<s> input_caption <image> edit </s>`; the source image is entity 0, the
    edited one the target. Extra seeds go to `variant_{v}_entity_0.png` / `variant_{v}_target.png`
    (v >= 1); stage 3 picks one of the 1 + variants pairs at random, as the official loader does.
    Drop mode removes the input caption (official random_drop_caption_prob for this source)."""
    if not pairs:
        raise ValueError("an InstructPix2Pix sample needs at least one (source, edited) image pair")

    def as_png(image):
        return image if isinstance(image, bytes) else png_bytes(image)

    text = input_caption + IMAGE_PLACEHOLDER + instruction
    images = {"entity_0.png": as_png(pairs[0][0]), "target.png": as_png(pairs[0][1])}
    for variant, (source, edited) in enumerate(pairs[1:], 1):
        images[f"variant_{variant}_entity_0.png"] = as_png(source)
        images[f"variant_{variant}_target.png"] = as_png(edited)
    entities = [{"name": None, "image": "entity_0.png", "masked": None}]
    meta = _meta("instructpix2pix", input_caption, text, IMAGE_PLACEHOLDER + instruction,
                 [[0, len(input_caption)]] if input_caption else [], entities, origin,
                 instruction=instruction, variants=len(pairs) - 1)
    return Sample(key, meta, images)


def openimage_sample(key: str, caption: str, layout: Layout, target: bytes | Image.Image,
                     crops: list[tuple[bytes | Image.Image, bytes | Image.Image]], origin: str = "") -> Sample:
    """Interleaved subject-driven sample: each entity word followed by its image; per entity the
    square crop and the masked crop (stage 3 picks one with p = 0.5, as the official loader)."""
    if len(crops) != len(layout.entities):
        raise ValueError(f"{len(layout.entities)} placed entities but {len(crops)} crop pairs")

    def as_png(image):
        return image if isinstance(image, bytes) else png_bytes(image)

    images = {"target.png": as_png(target)}
    entities = []
    for k, (name, (crop, masked)) in enumerate(zip(layout.entities, crops)):
        images[f"entity_{k}.png"] = as_png(crop)
        images[f"entity_{k}_masked.png"] = as_png(masked)
        entities.append({"name": name, "image": f"entity_{k}.png", "masked": f"entity_{k}_masked.png"})
    meta = _meta("openimage", caption, layout.text, layout.text_dropped, layout.drop_spans, entities, origin)
    return Sample(key, meta, images)
