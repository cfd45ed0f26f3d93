"""The nano world (train/nano/world.py) as a `LabelSource`: `build --source nano-world`.

The world knows every scene exactly, so it replaces the three labelling models:
  caption   the world's caption ("a red circle on the left and a blue cross on the right, on grey")
  entities  one per subject, named "<colour> <shape>" (a whole-word phrase of the caption, so the
            interleaved text becomes "a red circle <i> on the left and a blue cross <i> ...")
  crops     the world's re-rendered crop and masked crop of each subject (default), or, with
            `crops=mask`, the subject's coverage mask through the official crop recipe
  target    the rendered scene

Splits: a scene spec belongs to the world's held-out split or to its training split (a hash of
the spec, `world.split_of`), so held-out scenes can never appear in training data whatever the
seed. Default: the seed's own split (`world.TRAIN_SEED` -> train, `world.HELDOUT_SEED` -> held-out),
any other seed streams training scenes. Select the held-out stream explicitly with
`--source train.data.nano_labels:heldout` (or `source_options: {split: heldout}` in a config file).
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from .sources import EntityLabel, Scene

CROP_MODES = ("world", "mask")


def entity_name(subject: Any) -> str:
    """Entity phrase of one world subject: colour + shape, as it appears in the caption."""
    return f"{subject.colour} {subject.shape}"


class NanoWorldLabelSource:
    """`count` scenes of one world stream; `scene(i)` is a pure function of (seed, split, options, i).

    split         "auto" (the seed's split, training for seeds other than HELDOUT_SEED), "train"
                  or "heldout"
    num_subjects  1, 2 or None (random, as the world draws them)
    crops         "world" (ready crops from the world) or "mask" (official recipe on the masks)
    """

    def __init__(self, world: Any, seed: int = 0, count: int = 0, split: str = "auto",
                 num_subjects: int | None = None, crops: str = "world"):
        if count <= 0:
            raise ValueError("--source nano-world needs --count N (how many scenes to generate)")
        if split == "auto":
            split = world.default_split(seed) or "train"
        if split not in world.SPLITS:
            raise ValueError(f"nano-world split {split!r}: use one of {', '.join(world.SPLITS)} or auto")
        if num_subjects not in (None, 1, 2):
            raise ValueError(f"nano-world num_subjects {num_subjects!r}: use 1, 2 or leave it unset (random)")
        if crops not in CROP_MODES:
            raise ValueError(f"nano-world crops {crops!r}: use one of {', '.join(CROP_MODES)}")
        self.world, self.seed, self.count = world, int(seed), int(count)
        self.split, self.num_subjects, self.crops = split, num_subjects, crops

    def __len__(self) -> int:
        return self.count

    def scene(self, index: int) -> Scene:
        spec = self.world.spec_at(self.seed, index, self.num_subjects, self.split)
        rendered = self.world.render_scene(spec)
        entities = []
        for k, subject in enumerate(rendered.labels):
            if self.crops == "mask":
                entities.append(EntityLabel(entity_name(subject), mask=rendered.coverage[k]))
            else:
                entities.append(EntityLabel(entity_name(subject), crop=Image.fromarray(rendered.crops[k]),
                                            masked=Image.fromarray(rendered.masked_crops[k])))
        return Scene(key=f"{index:08d}", image=Image.fromarray(rendered.image), caption=rendered.caption,
                     entities=entities, origin=f"nano-world:{self.split}:{self.seed}:{index}")


def _world():
    from train.nano import world

    return world


def train(seed: int = 0, count: int = 0, **options: Any) -> NanoWorldLabelSource:
    """`--source train.data.nano_labels:train`: the training stream of seed `seed`."""
    return NanoWorldLabelSource(_world(), seed=seed, count=count, **{**options, "split": "train"})


def heldout(seed: int = 0, count: int = 0, **options: Any) -> NanoWorldLabelSource:
    """`--source train.data.nano_labels:heldout`: the held-out (evaluation) stream of seed `seed`."""
    return NanoWorldLabelSource(_world(), seed=seed, count=count, **{**options, "split": "heldout"})
