"""The nano world: procedural 64x64 scenes of one or two solid-coloured subjects on a plain background.

Everything here is a pure function of a seed (numpy ``Generator``, numpy rasterising); nothing is
downloaded. The world is small on purpose: a 2-core CPU must be able to train a diffusion model
on it, and a judge (``train.nano.judge``) must read it back almost perfectly.

Vocabulary
    colours     red, orange, yellow, green, blue, purple        (6, fixed sRGB values, ``PALETTE``)
    shapes      circle, square, triangle (apex up), cross (plus sign)    (4, never rotated)
    positions   left, centre, right          (3 horizontal slots; two subjects never share a slot)
    backgrounds grey, white, black, beige     (4 plain colours, each far from every subject colour)

    A blind guess of one subject (colour + shape) is right 1 / 24 = 4.2 % of the time.

Geometry (scene pixels, continuous coordinates, pixel ``i`` covers ``[i, i + 1)``)
    size        side of the subject's bounding square, an integer in [12, 18] px
                (circle diameter, square side, triangle base = height, cross span)
    centre x    slot centre (11 / 32 / 53) + jitter in [-3, 3] px
    centre y    32 + jitter in [-6, 6] px
    Every subject stays >= 2 px inside the image; two subjects' bounding squares are >= 4 px apart
    (a pair is redrawn until this holds, so the largest sizes are a little rarer in pairs).
    Two subjects of one scene differ in colour or shape (or both).

Rendering
    Each subject's coverage is the fraction of a 4 x 4 grid of sample points per pixel inside its
    exact geometry (anti-aliasing without a rasteriser's rounding); the image is
    ``background + coverage * (colour - background)``. So a pixel of coverage 1 is exactly the
    subject colour and a pixel of coverage 0 exactly the background.

Caption grammar (subjects ordered left to right)
    caption  := subject [" and " subject] ", on " background
    subject  := article " " colour " " shape " " where
    article  := "an" before a vowel ("an orange ...") else "a"
    where    := "on the left" | "in the centre" | "on the right"
    e.g. "a red triangle on the left, on grey",
         "a red triangle on the left and a blue circle on the right, on white"

Crops (like the official OpenImages data: a crop and a masked crop per subject)
    A square window centred on the subject, ``CROP_CONTEXT`` x its size, re-rendered (not
    upsampled) at ``CROP_PX`` x ``CROP_PX``: ``crop`` shows the scene in that window (neighbours
    included where they reach into it), ``masked_crop`` shows only the subject, on white.

Seeds and splits
    Scene ``i`` of a stream is drawn from ``np.random.default_rng([seed, i])`` (random access, so a
    dataset index is a scene). A scene spec belongs to the held-out split when a hash of its
    canonical text is 0 mod ``HELDOUT_MODULUS`` (about 1 spec in 10), otherwise to the training
    split; each stream redraws until it gets a spec of its split. ``TRAIN_SEED`` streams training
    scenes, ``HELDOUT_SEED`` held-out scenes: the two sets of specs are disjoint by construction,
    for any number of scenes, not just by luck of the seeds.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import numpy as np

from kosmosg_core.cli import OneValuePerFlagParser
from kosmosg_core.config import NANO_IMAGE_SIZE

logger = logging.getLogger(__name__)

IMAGE_PX = NANO_IMAGE_SIZE
CROP_PX = 64
CROP_CONTEXT = 1.5  # crop side / subject size
SUPERSAMPLE = 4

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (245, 220, 30),
    "green": (30, 160, 60),
    "blue": (30, 80, 225),
    "purple": (145, 50, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "beige": (225, 210, 175),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
BACKGROUNDS_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
POSITIONS: tuple[str, ...] = ("left", "centre", "right")
POSITION_PHRASES: dict[str, str] = {"left": "on the left", "centre": "in the centre", "right": "on the right"}
SLOT_CENTRES_X: dict[str, int] = {"left": 11, "centre": 32, "right": 53}
CENTRE_Y = 32

SIZE_RANGE = (12, 18)  # inclusive, px
JITTER_X = 3
JITTER_Y = 6
EDGE_MARGIN = 2
MIN_GAP = 4
CROSS_ARM = 0.38  # arm thickness / size
P_TWO_SUBJECTS = 0.5

TRAIN_SEED = 1_701_000  # stream of training scenes
HELDOUT_SEED = 2_903_000  # stream of held-out scenes (evaluation, judge accuracy)
HELDOUT_MODULUS = 10
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class SubjectSpec:
    """Exact labels of one subject; ``cx``/``cy`` is the centre of its bounding square in px."""

    colour: str
    shape: str
    position: str
    size: int
    cx: int
    cy: int

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the bounding square, continuous px."""
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

    @property
    def phrase(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape} {POSITION_PHRASES[self.position]}"


@dataclass(frozen=True)
class SceneSpec:
    """What a scene shows: subjects (sorted left to right) and the background name."""

    subjects: tuple[SubjectSpec, ...]
    background: str

    def canonical(self) -> str:
        """Stable text of the spec (hashing, set membership)."""
        parts = [f"{s.colour}:{s.shape}:{s.position}:{s.size}:{s.cx}:{s.cy}" for s in self.subjects]
        return "|".join(parts) + f"|bg={self.background}"


@dataclass
class Scene:
    """A rendered scene.

    image         uint8 [64, 64, 3]
    caption       see the module docstring's grammar
    labels        one ``SubjectSpec`` per subject, left to right
    masks         bool [S, 64, 64]: coverage >= 0.5 of each subject
    coverage      float32 [S, 64, 64]: exact anti-aliased coverage in [0, 1]
    crops         uint8 [S, CROP_PX, CROP_PX, 3]: square window of the scene around each subject
    masked_crops  uint8 [S, CROP_PX, CROP_PX, 3]: the same window, subject only, on white
    background    background name
    """

    image: np.ndarray
    caption: str
    labels: tuple[SubjectSpec, ...]
    masks: np.ndarray
    coverage: np.ndarray
    crops: np.ndarray
    masked_crops: np.ndarray
    background: str
    spec: SceneSpec = field(repr=False)


# ----------------------------------------------------------------------------- validation


def _check_name(kind: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; use one of {', '.join(allowed)}")


def validate_spec(spec: SceneSpec) -> None:
    """Raise ``ValueError`` naming the problem if ``spec`` is not a scene this world can show."""
    _check_name("background", spec.background, tuple(BACKGROUNDS))
    if not 1 <= len(spec.subjects) <= 2:
        raise ValueError(f"a scene has 1 or 2 subjects, got {len(spec.subjects)}")
    for s in spec.subjects:
        _check_name("colour", s.colour, COLOURS)
        _check_name("shape", s.shape, SHAPES)
        _check_name("position", s.position, POSITIONS)
        x0, y0, x1, y1 = s.bbox
        if min(x0, y0) < EDGE_MARGIN or max(x1, y1) > IMAGE_PX - EDGE_MARGIN:
            raise ValueError(f"subject {s} reaches within {EDGE_MARGIN} px of the image edge; move or shrink it")
        if position_of_x(s.cx) != s.position:
            raise ValueError(f"subject {s}: centre x {s.cx} lies in slot {position_of_x(s.cx)!r}, not {s.position!r}")
    if len(spec.subjects) == 2:
        a, b = spec.subjects
        if a.position == b.position:
            raise ValueError(f"two subjects share the slot {a.position!r}; give them different positions")
        if (a.colour, a.shape) == (b.colour, b.shape):
            raise ValueError(f"two subjects are both {a.colour} {a.shape}s; change the colour or shape of one")
        if _gap(a, b) < MIN_GAP:
            raise ValueError(f"subjects {a} and {b} are closer than {MIN_GAP} px; move them apart")
    if list(spec.subjects) != sorted(spec.subjects, key=lambda s: s.cx):
        raise ValueError("subjects must be listed left to right")


def position_of_x(x: float, width: float = IMAGE_PX) -> str:
    """Slot name of a horizontal coordinate: thirds of the image width."""
    third = width / 3
    return "left" if x < third else ("centre" if x < 2 * third else "right")


def _gap(a: SubjectSpec, b: SubjectSpec) -> float:
    """Distance between two bounding squares (Chebyshev sense; negative when they overlap)."""
    dx = abs(a.cx - b.cx) - (a.size + b.size) / 2
    dy = abs(a.cy - b.cy) - (a.size + b.size) / 2
    return max(dx, dy)


# ----------------------------------------------------------------------------- sampling


def _sample_subject(rng: np.random.Generator, colour: str, shape: str, position: str) -> SubjectSpec:
    size = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
    half = size / 2
    slot = SLOT_CENTRES_X[position]
    lo_x = max(slot - JITTER_X, int(np.ceil(EDGE_MARGIN + half)))
    hi_x = min(slot + JITTER_X, int(np.floor(IMAGE_PX - EDGE_MARGIN - half)))
    lo_y = max(CENTRE_Y - JITTER_Y, int(np.ceil(EDGE_MARGIN + half)))
    hi_y = min(CENTRE_Y + JITTER_Y, int(np.floor(IMAGE_PX - EDGE_MARGIN - half)))
    cx = int(rng.integers(lo_x, hi_x + 1))
    cy = int(rng.integers(lo_y, hi_y + 1))
    return SubjectSpec(colour, shape, position, size, cx, cy)


def make_spec(
    rng: np.random.Generator,
    subjects: Sequence[tuple[str, str, str]],
    background: str,
) -> SceneSpec:
    """A spec for a requested layout: ``subjects`` as (colour, shape, position); size and
    placement jitter drawn from ``rng`` (redrawn until the pair keeps its gap)."""
    for colour, shape, position in subjects:
        _check_name("colour", colour, COLOURS)
        _check_name("shape", shape, SHAPES)
        _check_name("position", position, POSITIONS)
    for _ in range(1000):
        drawn = sorted((_sample_subject(rng, *s) for s in subjects), key=lambda s: s.cx)
        if len(drawn) < 2 or _gap(drawn[0], drawn[1]) >= MIN_GAP:
            spec = SceneSpec(tuple(drawn), background)
            validate_spec(spec)
            return spec
    raise ValueError(f"could not place subjects {subjects} with a {MIN_GAP} px gap")  # pragma: no cover


def sample_spec(rng: np.random.Generator, num_subjects: int | None = None) -> SceneSpec:
    """Draw a random spec: 1 or 2 subjects (``P_TWO_SUBJECTS``), uniform vocabulary."""
    if num_subjects is None:
        num_subjects = 2 if rng.random() < P_TWO_SUBJECTS else 1
    if num_subjects not in (1, 2):
        raise ValueError(f"num_subjects must be 1, 2 or None (random), got {num_subjects!r}")
    background = BACKGROUNDS_NAMES[int(rng.integers(len(BACKGROUNDS_NAMES)))]
    positions = [POSITIONS[int(i)] for i in rng.permutation(len(POSITIONS))[:num_subjects]]
    while True:
        kinds = [(COLOURS[int(rng.integers(len(COLOURS)))], SHAPES[int(rng.integers(len(SHAPES)))]) for _ in positions]
        if len(set(kinds)) == len(kinds):
            break
    return make_spec(rng, [(c, s, p) for (c, s), p in zip(kinds, positions)], background)



def split_of(spec: SceneSpec) -> str:
    """'heldout' or 'train': a fixed hash of the spec's canonical text (see module docstring)."""
    digest = hashlib.blake2b(spec.canonical().encode(), digest_size=8).digest()
    return "heldout" if int.from_bytes(digest, "little") % HELDOUT_MODULUS == 0 else "train"


def default_split(seed: int) -> str | None:
    """The split a seed streams by default: TRAIN_SEED -> 'train', HELDOUT_SEED -> 'heldout', else None."""
    return {TRAIN_SEED: "train", HELDOUT_SEED: "heldout"}.get(seed)


def spec_at(seed: int, index: int, num_subjects: int | None = None, split: str | None = "auto") -> SceneSpec:
    """Spec of scene ``index`` of stream ``seed`` (random access; redraws until it is in ``split``).

    ``split="auto"`` uses ``default_split(seed)``; ``None`` accepts any spec.
    """
    if split == "auto":
        split = default_split(seed)
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, 'auto' or None, got {split!r}")
    if index < 0:
        raise ValueError(f"scene index must be >= 0, got {index}")
    rng = np.random.default_rng([seed, index])
    while True:
        spec = sample_spec(rng, num_subjects)
        if split is None or split_of(spec) == split:
            return spec


# ----------------------------------------------------------------------------- rendering


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Point-in-shape test in unit coordinates (centre 0, bounding square [-0.5, 0.5]^2)."""
    if shape == "circle":
        return u * u + v * v <= 0.25
    if shape == "square":
        return (np.abs(u) <= 0.5) & (np.abs(v) <= 0.5)
    if shape == "triangle":  # apex (0, -0.5), base from (-0.5, 0.5) to (0.5, 0.5)
        return (v <= 0.5) & (np.abs(u) <= (v + 0.5) / 2)
    if shape == "cross":
        t = CROSS_ARM / 2
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.5) & (av <= t)) | ((au <= t) & (av <= 0.5))
    raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")


def subject_coverage(
    shape: str,
    cx: float,
    cy: float,
    size: float,
    window: tuple[float, float, float] = (0.0, 0.0, IMAGE_PX),
    out_px: int = IMAGE_PX,
) -> np.ndarray:
    """Anti-aliased coverage float32 [out_px, out_px] in [0, 1] of one shape.

    ``window`` = (x0, y0, side) is the square of scene coordinates shown in the output. Coverage is
    the fraction of a SUPERSAMPLE x SUPERSAMPLE grid of sample points inside the shape (exact
    geometry; sample points never fall on an edge of an integer-sized, integer-centred subject).
    """
    n = out_px * SUPERSAMPLE
    t = window[0] + (np.arange(n) + 0.5) * (window[2] / n)  # sample x (and y) in scene px
    u = (t - cx) / size
    v = ((window[1] - window[0]) + t - cy) / size
    inside = _inside(shape, u[None, :], v[:, None])  # [n, n], rows = y
    return inside.reshape(out_px, SUPERSAMPLE, out_px, SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)


def _composite(background: tuple[int, int, int], layers: Sequence[tuple[np.ndarray, tuple[int, int, int]]]) -> np.ndarray:
    """``background + sum_i coverage_i * (colour_i - background)`` -> uint8 [H, W, 3]."""
    h, w = layers[0][0].shape if layers else (IMAGE_PX, IMAGE_PX)
    bg = np.asarray(background, dtype=np.float32)
    out = np.broadcast_to(bg, (h, w, 3)).copy()
    for cov, colour in layers:
        out += cov[..., None] * (np.asarray(colour, dtype=np.float32) - bg)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def with_attribute(spec: SceneSpec, index: int, attribute: str, value: str) -> SceneSpec | None:
    """``spec`` with subject ``index``'s ``attribute`` ('colour' or 'shape') set to ``value``, everything
    else (sizes, places, background) kept; None when the result is not a valid scene (e.g. two
    identical subjects)."""
    if attribute not in ("colour", "shape"):
        raise ValueError(f"attribute must be 'colour' or 'shape', got {attribute!r}")
    subjects = list(spec.subjects)
    subjects[index] = replace(subjects[index], **{attribute: value})
    changed = SceneSpec(tuple(subjects), spec.background)
    try:
        validate_spec(changed)
    except ValueError:
        return None
    return changed


def caption_of(spec: SceneSpec) -> str:
    return " and ".join(s.phrase for s in spec.subjects) + f", on {spec.background}"


def render_scene(spec: SceneSpec) -> Scene:
    """Render a spec (exact labels) into a ``Scene`` with masks and crops."""
    validate_spec(spec)
    bg = BACKGROUNDS[spec.background]
    coverage = np.stack([subject_coverage(s.shape, s.cx, s.cy, s.size) for s in spec.subjects])
    image = _composite(bg, [(c, PALETTE[s.colour]) for c, s in zip(coverage, spec.subjects)])
    crops, masked = [], []
    for s in spec.subjects:
        side = s.size * CROP_CONTEXT
        window = (s.cx - side / 2, s.cy - side / 2, side)
        layers = [(subject_coverage(o.shape, o.cx, o.cy, o.size, window, CROP_PX), PALETTE[o.colour]) for o in spec.subjects]
        crops.append(_composite(bg, layers))
        own = subject_coverage(s.shape, s.cx, s.cy, s.size, window, CROP_PX)
        masked.append(_composite(BACKGROUNDS["white"], [(own, PALETTE[s.colour])]))
    return Scene(
        image=image,
        caption=caption_of(spec),
        labels=spec.subjects,
        masks=coverage >= 0.5,
        coverage=coverage,
        crops=np.stack(crops),
        masked_crops=np.stack(masked),
        background=spec.background,
        spec=spec,
    )


def scenes(
    seed: int,
    n: int,
    *,
    start: int = 0,
    num_subjects: int | None = None,
    split: str | None = "auto",
) -> Iterator[Scene]:
    """Scenes ``start .. start + n - 1`` of stream ``seed`` (see ``spec_at`` for ``split``)."""
    for index in range(start, start + n):
        yield render_scene(spec_at(seed, index, num_subjects, split))


# ----------------------------------------------------------------------------- captions -> labels


def parse_caption(caption: str) -> tuple[list[tuple[str, str, str]], str]:
    """Inverse of the caption grammar: ([(colour, shape, position), ...], background).

    Raises ``ValueError`` naming the caption when it does not follow the grammar.
    """
    head, sep, background = caption.rpartition(", on ")
    if not sep or background not in BACKGROUNDS:
        raise ValueError(f"caption {caption!r} does not end with ', on <background>' ({', '.join(BACKGROUNDS)})")
    phrase_to_position = {v: k for k, v in POSITION_PHRASES.items()}
    subjects = []
    for part in head.split(" and "):
        words = part.split(" ")
        if len(words) != 6 or words[0] not in ("a", "an"):
            raise ValueError(f"caption {caption!r}: subject {part!r} is not '<a|an> <colour> <shape> <where>'")
        colour, shape, where = words[1], words[2], " ".join(words[3:])
        if colour not in PALETTE or shape not in SHAPES or where not in phrase_to_position:
            raise ValueError(f"caption {caption!r}: subject {part!r} uses a word outside the vocabulary")
        subjects.append((colour, shape, phrase_to_position[where]))
    if not 1 <= len(subjects) <= 2:
        raise ValueError(f"caption {caption!r} names {len(subjects)} subjects; the world has 1 or 2")
    return subjects, background


# ----------------------------------------------------------------------------- image-caption pairs on disk


def write_pairs(out_dir, count: int, seed: int = TRAIN_SEED, split: str | None = "auto") -> int:
    """Scenes ``0 .. count-1`` of a stream as ``<index>.png`` + ``<index>.txt`` (its caption): the
    image-caption pair folder that ``python -m train.data ingest-pairs`` reads. -> pairs written."""
    from pathlib import Path

    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        scene = render_scene(spec_at(seed, index, split=split))
        Image.fromarray(scene.image).save(out / f"{index:08d}.png")
        (out / f"{index:08d}.txt").write_text(scene.caption + "\n")
    return count


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneValuePerFlagParser(prog="python -m train.nano.world", allow_abbrev=False,
                                   description="write world scenes as an image-caption pair folder "
                                               "(<index>.png + <index>.txt) for python -m train.data ingest-pairs")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--count", type=int, required=True, help="number of scenes")
    parser.add_argument("--seed", type=int, default=TRAIN_SEED, help=f"scene stream (training {TRAIN_SEED}, "
                                                                      f"held-out {HELDOUT_SEED})")
    parser.add_argument("--split", default="auto", choices=("auto",) + SPLITS,
                        help="keep scenes of this split (auto: the stream's own)")
    args = parser.parse_args(argv)
    written = write_pairs(args.out, args.count, args.seed, args.split)
    print(f"wrote {written} image-caption pairs to {args.out}")
    return 0


if __name__ == "__main__":
    from train.common.config import exit_on_input_error

    raise SystemExit(exit_on_input_error(main))
