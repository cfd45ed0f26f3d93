"""Adapter: the nano world (train/nano/world.py) as a `LabelSource` for `build --source nano-world`.

The world supplies, per (seed, index), what the three models would otherwise produce: the scene
image, its caption and its entities with masks (or ready crops). Expected world API (the first
of these names found is used): `labelled_scene(seed, index, **options)`, `make_scene(...)`,
`render_scene(...)`, `generate_scene(...)`, `scene(...)`, returning either a
`train.data.sources.Scene` or any object / mapping with
  image (PIL image or [H, W, 3] uint8 array), caption (str), entities (list of objects / mappings
  with name (or label / word) and mask ([H, W] bool/float at image size) and/or crop, masked).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from .sources import EntityLabel, Scene

SCENE_FUNCTIONS = ("labelled_scene", "make_scene", "render_scene", "generate_scene", "scene")


def _get(obj: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        if isinstance(obj, dict) and name in obj:
            return obj[name]
        if not isinstance(obj, dict) and hasattr(obj, name):
            return getattr(obj, name)
    return default


def _as_image(value: Any) -> Image.Image | None:
    if value is None or isinstance(value, Image.Image):
        return value
    array = np.asarray(value)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def to_scene(raw: Any, key: str) -> Scene:
    """Normalise whatever the world returns into a `Scene`."""
    if isinstance(raw, Scene):
        return raw
    entities = []
    for entity in _get(raw, "entities", default=[]) or []:
        mask = _get(entity, "mask")
        entities.append(EntityLabel(name=str(_get(entity, "name", "label", "word", default="")),
                                    mask=None if mask is None else np.asarray(mask, dtype=np.float32),
                                    crop=_as_image(_get(entity, "crop", "image")),
                                    masked=_as_image(_get(entity, "masked", "masked_crop"))))
    image = _as_image(_get(raw, "image", "target"))
    if image is None:
        raise ValueError(f"nano world scene {key}: no image")
    return Scene(key=key, image=image, caption=str(_get(raw, "caption", "text", default="")),
                 entities=entities, origin=f"nano-world:{key}")


class NanoWorldLabelSource:
    """`count` scenes of the nano world for one seed; scene(i) is a pure function of (seed, i)."""

    def __init__(self, world: Any, seed: int = 0, count: int = 0, **options: Any):
        if count <= 0:
            raise ValueError("--source nano-world needs --count N (how many scenes to generate)")
        self.make = next((getattr(world, n) for n in SCENE_FUNCTIONS if callable(getattr(world, n, None))), None)
        if self.make is None:
            raise ValueError(f"train/nano/world.py has none of {', '.join(SCENE_FUNCTIONS)}(seed, index, **options)")
        self.seed, self.count, self.options = seed, count, options

    def __len__(self) -> int:
        return self.count

    def scene(self, index: int) -> Scene:
        return to_scene(self.make(seed=self.seed, index=index, **self.options), f"{index:08d}")
