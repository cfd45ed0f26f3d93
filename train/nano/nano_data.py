"""World scenes as tensors for the nano training commands (text encoder, VAE, U-Net).

Only the image, caption and labels of a scene are needed here, so the image is rendered directly
from its spec (no masks or crops): ``train.nano.world.render_scene`` would give the same pixels,
about 4x slower.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from train.nano import world


@dataclass
class SceneBatch:
    """images uint8 [N, 3, 64, 64]; captions list[str] (N); specs list[world.SceneSpec] (N)."""

    images: torch.Tensor
    captions: list[str]
    specs: list

    def __len__(self) -> int:
        return len(self.captions)


def world_vocabulary() -> list[str]:
    """Every word (and the comma) a world caption can contain, in a fixed order."""
    glue = ["a", "an", "and", "on", "in", "the", ","]
    phrases = list(world.COLOURS) + list(world.SHAPES) + list(world.POSITION_PHRASES.values()) + list(world.BACKGROUNDS)
    words = list(glue)
    for phrase in phrases:
        for word in re.findall(r"[a-z]+|,", phrase):
            if word not in words:
                words.append(word)
    return words


def render_image(spec) -> np.ndarray:
    """uint8 [64, 64, 3]: ``background + coverage * (colour - background)`` (world's formula)."""
    bg = np.asarray(world.BACKGROUNDS[spec.background], dtype=np.float32)
    out = np.broadcast_to(bg, (world.IMAGE_PX, world.IMAGE_PX, 3)).copy()
    for s in spec.subjects:
        cov = world.subject_coverage(s.shape, s.cx, s.cy, s.size)
        out += cov[..., None] * (np.asarray(world.PALETTE[s.colour], dtype=np.float32) - bg)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def load_scenes(split: str, count: int, start: int = 0, num_subjects: int | None = None) -> SceneBatch:
    """Scenes ``start .. start+count-1`` of the ``split`` stream ('train' or 'heldout')."""
    seeds = {"train": world.TRAIN_SEED, "heldout": world.HELDOUT_SEED}
    if split not in seeds:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if count <= 0:
        raise ValueError(f"count must be > 0 (number of scenes), got {count}")
    specs = [world.spec_at(seeds[split], i, num_subjects) for i in range(start, start + count)]
    images = np.stack([render_image(s) for s in specs])  # [N, H, W, 3]
    return SceneBatch(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        captions=[world.caption_of(s) for s in specs],
        specs=specs,
    )


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [B, 3, H, W] in [0, 1]."""
    return images_uint8.float() / 255.0
