"""What the out-of-the-box workflow (workflows/kosmosg-nano-out-of-the-box.json) asks for: its two
subject images, its prompt, and the judge of the image it produces.

    python tests/support/make_workflows.py   # writes the workflows and these subject images (workflows/input/)

The request is a two-subject case of the nano Kosmos-G evaluation (train.eval nano), in its wording:
    "a <i> on the left and a <i> on the right, on grey"    first <i> = a red circle, second = a blue square
Subject images: the world's masked crops (the subject alone on white, re-rendered at 64 x 64: what
training and train.eval nano feed Kosmos-G) of the first red circle and the first blue square of the
held-out scene stream (world.HELDOUT_SEED, from scene SUBJECT_SCENES_START; see
train.eval.nano_kosmosg.first_heldout_subject). Pure functions of the world: regenerating gives the
same pixels.

Judging: the labels are each subject image's known colour and shape at the position the text gives
it (each <i> replaced by its subject's words makes a world caption, read back by
world.parse_caption); ``judge_output`` scores an image with train.nano.judge.score_against, as the
evaluation's subject fidelity does, and reads the background as its text fidelity does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple


class Subject(NamedTuple):
    """One subject image of the workflow: its file in workflows/input/ and what it shows."""

    file: str
    colour: str
    shape: str


SUBJECTS = (Subject("nano_subject_red_circle.png", "red", "circle"),
            Subject("nano_subject_blue_square.png", "blue", "square"))  # in <i> order
PROMPT = "a <i> on the left and a <i> on the right, on grey"
SUBJECT_SCENES_START = 0  # held-out scene index where the search for each subject starts
IMAGE_PX = 64  # the workflow's EmptyLatentImage width and height (the world's scene size)


def subject_images() -> list:
    """The subject images, uint8 [64, 64, 3] each, in SUBJECTS order."""
    from train.eval.nano_kosmosg import first_heldout_subject
    from train.nano import world

    images = []
    for subject in SUBJECTS:
        spec, index = first_heldout_subject(subject.colour, subject.shape, SUBJECT_SCENES_START)
        images.append(world.render_scene(spec).masked_crops[index])
    return images


def write_subject_images(out_dir) -> list[Path]:
    """Write the subject images as PNGs named SUBJECTS[i].file into ``out_dir`` -> their paths."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for subject, image in zip(SUBJECTS, subject_images()):
        Image.fromarray(image).save(out / subject.file)
        paths.append(out / subject.file)
    return paths


def asked_scene() -> tuple[list[tuple[str, str, str]], str]:
    """What PROMPT asks for: ([(colour, shape, position), ...] left to right, background)."""
    from kosmosg_core.config import IMAGE_PLACEHOLDER
    from train.nano import world

    pieces = PROMPT.split(IMAGE_PLACEHOLDER)
    if len(pieces) != len(SUBJECTS) + 1:
        raise ValueError(f"PROMPT {PROMPT!r} has {len(pieces) - 1} {IMAGE_PLACEHOLDER} for {len(SUBJECTS)} "
                         "subject images; write one per image")
    caption = pieces[0] + "".join(f"{s.colour} {s.shape}{rest}" for s, rest in zip(SUBJECTS, pieces[1:]))
    return world.parse_caption(caption)


def judge_output(image: Any) -> dict[str, Any]:
    """Score the workflow's output image (uint8 or float [64, 64, 3]) against what PROMPT asks.

    Returns judge.score_against's dict (``all_correct``: every asked subject with its colour and
    shape at its position and no other subject; per attribute, ``per_subject``, ``readings``) plus
    ``background`` (the asked background is read) and ``right`` (``all_correct`` and ``background``).
    """
    from train.nano import judge

    labels, background = asked_scene()
    score = judge.score_against(image, labels)
    score["background"] = judge.read_background(image) == background
    score["right"] = bool(score["all_correct"] and score["background"])
    return score
