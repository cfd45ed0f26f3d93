"""The nano world: deterministic, disjoint splits, vocabulary, caption grammar, masks, crops."""

import itertools
import re

import numpy as np
import pytest

from train.nano import world


def _first(seed, n, **kw):
    return list(world.scenes(seed, n, **kw))


def test_same_seed_gives_identical_scenes_and_different_seeds_differ():
    a = _first(world.TRAIN_SEED, 20)
    b = _first(world.TRAIN_SEED, 20)
    for x, y in zip(a, b):
        assert x.caption == y.caption and x.labels == y.labels
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.crops, y.crops)
        np.testing.assert_array_equal(x.masked_crops, y.masked_crops)
    other = _first(world.TRAIN_SEED + 1, 20, split=None)
    assert [s.caption for s in other] != [s.caption for s in a]
    assert sum(not np.array_equal(x.image, y.image) for x, y in zip(a, other)) >= 18


def test_random_access_matches_the_stream():
    stream = _first(world.HELDOUT_SEED, 6)
    tail = list(world.scenes(world.HELDOUT_SEED, 3, start=3))
    for i in range(3):
        assert tail[i].spec == stream[3 + i].spec
        np.testing.assert_array_equal(tail[i].image, stream[3 + i].image)


def test_train_and_heldout_streams_are_disjoint():
    n = 3000
    train = {world.spec_at(world.TRAIN_SEED, i).canonical() for i in range(n)}
    held = {world.spec_at(world.HELDOUT_SEED, i).canonical() for i in range(n)}
    assert not train & held
    assert len(held) > 0.95 * n  # specs are varied, not a handful repeated (1-subject specs repeat a little)
    assert all(world.split_of(world.spec_at(world.HELDOUT_SEED, i)) == "heldout" for i in range(50))
    # Without the split filter about 1 in HELDOUT_MODULUS specs is held-out.
    free = [world.split_of(world.spec_at(12345, i, split=None)) for i in range(2000)]
    assert 0.06 < free.count("heldout") / len(free) < 0.14


def test_vocabulary_makes_a_blind_subject_guess_at_most_5_percent():
    assert len(world.COLOURS) >= 5 and len(world.SHAPES) >= 4 and len(world.POSITIONS) >= 3
    assert 1 / (len(world.COLOURS) * len(world.SHAPES)) <= 0.05
    # Every colour, shape, position and background actually occurs, roughly uniformly.
    specs = [world.spec_at(world.TRAIN_SEED, i) for i in range(2000)]
    subjects = [s for spec in specs for s in spec.subjects]
    for attr, vocab in (("colour", world.COLOURS), ("shape", world.SHAPES), ("position", world.POSITIONS)):
        counts = {v: sum(getattr(s, attr) == v for s in subjects) for v in vocab}
        assert min(counts.values()) > 0.6 * len(subjects) / len(vocab), (attr, counts)
    bgs = {b: sum(spec.background == b for spec in specs) for b in world.BACKGROUNDS}
    assert min(bgs.values()) > 0.6 * len(specs) / len(bgs)
    two = sum(len(spec.subjects) == 2 for spec in specs) / len(specs)
    assert 0.4 < two < 0.6


def test_every_subject_colour_contrasts_with_every_background_and_other_colours():
    for c, b in itertools.product(world.PALETTE.values(), world.BACKGROUNDS.values()):
        assert np.linalg.norm(np.subtract(c, b)) > 90
    for c1, c2 in itertools.combinations(world.PALETTE.values(), 2):
        assert np.linalg.norm(np.subtract(c1, c2)) > 80


CAPTION_RE = re.compile(
    r"^(an? (red|orange|yellow|green|blue|purple) (circle|square|triangle|cross) (on the left|in the centre|on the right))"
    r"( and (an? (red|orange|yellow|green|blue|purple) (circle|square|triangle|cross) (on the left|in the centre|on the right)))?"
    r", on (grey|white|black|beige)$"
)


def test_caption_grammar_and_round_trip():
    for scene in _first(world.TRAIN_SEED, 200):
        assert CAPTION_RE.match(scene.caption), scene.caption
        for s in scene.labels:
            article = "an" if s.colour == "orange" else "a"
            assert f"{article} {s.colour} {s.shape} {world.POSITION_PHRASES[s.position]}" in scene.caption
        subjects, bg = world.parse_caption(scene.caption)
        assert bg == scene.background
        assert subjects == [(s.colour, s.shape, s.position) for s in scene.labels]
    spec = world.SceneSpec(
        (world.SubjectSpec("red", "triangle", "left", 14, 12, 30), world.SubjectSpec("blue", "circle", "right", 16, 52, 34)),
        "white",
    )
    assert world.render_scene(spec).caption == "a red triangle on the left and a blue circle on the right, on white"
    one = world.SceneSpec((world.SubjectSpec("orange", "cross", "centre", 14, 32, 32),), "grey")
    assert world.render_scene(one).caption == "an orange cross in the centre, on grey"


@pytest.mark.parametrize("bad", ["a red blob on the left, on grey", "a red circle on the left", "a red circle at the top, on grey",
                                 "a red circle on the left and a blue square in the centre and a green cross on the right, on grey"])
def test_parse_caption_refuses_text_outside_the_grammar(bad):
    with pytest.raises(ValueError, match="caption"):
        world.parse_caption(bad)


def test_subjects_are_ordered_never_share_a_slot_never_overlap_and_stay_inside():
    for scene in _first(world.TRAIN_SEED, 300):
        xs = [s.cx for s in scene.labels]
        assert xs == sorted(xs)
        assert len({s.position for s in scene.labels}) == len(scene.labels)
        for s in scene.labels:
            assert world.SIZE_RANGE[0] <= s.size <= world.SIZE_RANGE[1]
            assert world.position_of_x(s.cx) == s.position
            assert abs(s.cx - world.SLOT_CENTRES_X[s.position]) <= world.JITTER_X
        if len(scene.labels) == 2:
            assert not (scene.coverage[0] > 0).__and__(scene.coverage[1] > 0).any()
            assert (scene.labels[0].colour, scene.labels[0].shape) != (scene.labels[1].colour, scene.labels[1].shape)
        # Nothing drawn in the outer ring: subjects stay EDGE_MARGIN px inside.
        cov = scene.coverage.sum(0)
        m = world.EDGE_MARGIN
        assert cov[:m].max() == 0 and cov[-m:].max() == 0 and cov[:, :m].max() == 0 and cov[:, -m:].max() == 0


def test_masks_match_the_drawn_pixels():
    for scene in _first(world.HELDOUT_SEED, 100):
        bg = np.array(world.BACKGROUNDS[scene.background])
        img = scene.image.astype(int)
        anything = scene.coverage.sum(0) > 0
        assert (img[~anything] == bg).all()
        for s, mask, cov in zip(scene.labels, scene.masks, scene.coverage):
            colour = np.array(world.PALETTE[s.colour])
            assert (img[cov == 1.0] == colour).all()
            # Every pixel is the coverage blend of subject and background (within rounding).
            drawn = cov > 0
            expected = bg + cov[..., None] * (colour - bg)
            assert np.abs(img[drawn] - expected[drawn]).max() <= 0.5 + 1e-6
            # Mask pixels are at least as close to the subject colour as to the background (equal
            # at coverage 0.5, up to rounding), and the subject's remaining rim pixels the reverse.
            d_sub = np.linalg.norm(img - colour, axis=-1)
            d_bg = np.linalg.norm(img - bg, axis=-1)
            assert (d_sub[mask] <= d_bg[mask] + 2).all()
            rim = drawn & ~mask
            assert (d_bg[rim] <= d_sub[rim] + 2).all()
            assert mask.sum() > 0.4 * s.size**2
            # The mask's extent is the labelled size (+-1 px of anti-aliasing).
            ys, xs = np.nonzero(mask)
            assert abs((xs.max() - xs.min() + 1) - s.size) <= 1
            assert abs((ys.min() + ys.max() + 1) / 2 - s.cy) <= 1


def test_crops_contain_the_subject():
    for scene in _first(world.TRAIN_SEED, 60):
        for s, crop, masked in zip(scene.labels, scene.crops, scene.masked_crops):
            assert crop.shape == masked.shape == (world.CROP_PX, world.CROP_PX, 3)
            colour = np.array(world.PALETTE[s.colour])
            c = world.CROP_PX // 2
            centre = crop[c - 2 : c + 2, c - 2 : c + 2].reshape(-1, 3)
            # The subject's centre region is its colour (the triangle's too: its bbox centre is inside).
            assert (np.abs(centre.astype(int) - colour).max(-1) <= 2).all()
            is_subject = np.abs(masked.astype(int) - colour).max(-1) <= 2
            # It fills a subject-sized part of the crop: side 1/CROP_CONTEXT of the crop.
            frac = is_subject.mean()
            assert 0.3 / world.CROP_CONTEXT**2 < frac <= 1.0 / world.CROP_CONTEXT**2 + 0.02
            white = np.array(world.BACKGROUNDS["white"])
            assert (masked[0] == white).all() and (masked[-1] == white).all()
            # The crop's border is the scene's background unless a neighbour reaches into it.
            bg = np.array(world.BACKGROUNDS[scene.background])
            if len(scene.labels) == 1:
                assert (crop[0] == bg).all() and (crop[:, 0] == bg).all()


def test_bad_specs_and_names_are_refused_with_a_clear_message():
    s = world.SubjectSpec
    with pytest.raises(ValueError, match="colour 'pink'"):
        world.render_scene(world.SceneSpec((s("pink", "circle", "left", 14, 12, 32),), "grey"))
    with pytest.raises(ValueError, match="share the slot"):
        world.render_scene(world.SceneSpec((s("red", "circle", "left", 12, 10, 32), s("blue", "square", "left", 12, 14, 32)), "grey"))
    with pytest.raises(ValueError, match="edge"):
        world.render_scene(world.SceneSpec((s("red", "circle", "left", 18, 5, 32),), "grey"))
    with pytest.raises(ValueError, match="slot"):
        world.render_scene(world.SceneSpec((s("red", "circle", "left", 14, 40, 32),), "grey"))
    with pytest.raises(ValueError, match="background"):
        world.make_spec(np.random.default_rng(0), [("red", "circle", "left")], "pink")
    with pytest.raises(ValueError, match="num_subjects"):
        world.sample_spec(np.random.default_rng(0), num_subjects=3)
    with pytest.raises(ValueError, match="split"):
        world.spec_at(0, 0, split="validation")


def test_make_spec_renders_a_requested_layout():
    rng = np.random.default_rng(1)
    spec = world.make_spec(rng, [("green", "cross", "right"), ("yellow", "triangle", "left")], "black")
    assert [(s.colour, s.shape, s.position) for s in spec.subjects] == [("yellow", "triangle", "left"), ("green", "cross", "right")]
    scene = world.render_scene(spec)
    assert scene.caption == "a yellow triangle on the left and a green cross on the right, on black"
    assert scene.masks.shape == (2, 64, 64) and scene.image.shape == (64, 64, 3)


def test_write_pairs_folder_holds_training_scenes_and_their_captions(tmp_path):
    from PIL import Image

    assert world.main(["--out", str(tmp_path), "--count", "3"]) == 0
    for index in range(3):
        spec = world.spec_at(world.TRAIN_SEED, index)
        assert world.split_of(spec) == "train"
        image = np.asarray(Image.open(tmp_path / f"{index:08d}.png"))
        assert np.array_equal(image, world.render_scene(spec).image)
        assert (tmp_path / f"{index:08d}.txt").read_text().strip() == world.caption_of(spec)


def test_with_attribute_changes_one_subject_attribute_only():
    spec = next(s for s in (world.spec_at(world.TRAIN_SEED, i) for i in range(50)) if len(s.subjects) == 2)
    first = spec.subjects[0]
    new_shape = next(x for x in world.SHAPES if x not in (first.shape, spec.subjects[1].shape))
    changed = world.with_attribute(spec, 0, "shape", new_shape)
    assert changed.subjects[0].shape == new_shape and changed.subjects[1] == spec.subjects[1]
    assert (changed.subjects[0].colour, changed.subjects[0].cx, changed.subjects[0].size) == (first.colour, first.cx, first.size)
    assert changed.background == spec.background
    assert world.caption_of(changed) == world.caption_of(spec).replace(first.shape, new_shape, 1)
    # two identical subjects are not a valid scene
    other = spec.subjects[1]
    same_shape = world.with_attribute(spec, 0, "shape", other.shape)
    if first.colour == other.colour:
        assert same_shape is None
    else:
        assert same_shape is not None and world.with_attribute(same_shape, 0, "colour", other.colour) is None
    with pytest.raises(ValueError, match="attribute"):
        world.with_attribute(spec, 0, "size", "big")


def test_sizes_and_jitter_cover_their_whole_inclusive_ranges():
    """SIZE_RANGE and the +-JITTER_X / +-JITTER_Y placement jitter are inclusive: both ends occur."""
    subjects = [s for i in range(1500) for s in world.spec_at(world.TRAIN_SEED, i, split=None).subjects]
    assert {s.size for s in subjects} == set(range(world.SIZE_RANGE[0], world.SIZE_RANGE[1] + 1))
    jitter_x = {s.cx - world.SLOT_CENTRES_X[s.position] for s in subjects}
    assert jitter_x == set(range(-world.JITTER_X, world.JITTER_X + 1))
    assert {s.cy - world.CENTRE_Y for s in subjects} == set(range(-world.JITTER_Y, world.JITTER_Y + 1))


def test_scene_i_is_drawn_from_default_rng_of_seed_and_index():
    """Scene i of stream seed comes from np.random.default_rng([seed, i]) (module docstring), so streams
    of neighbouring seeds do not repeat each other shifted by one index."""
    for seed, index in ((world.TRAIN_SEED, 0), (world.TRAIN_SEED, 7), (world.HELDOUT_SEED, 3)):
        expected = world.sample_spec(np.random.default_rng([seed, index]))
        assert world.spec_at(seed, index, split=None) == expected
    shifted = [world.spec_at(world.TRAIN_SEED + 1, i, split=None) for i in range(20)]
    assert sum(a == world.spec_at(world.TRAIN_SEED, i + 1, split=None) for i, a in enumerate(shifted)) == 0


def test_validate_spec_refuses_close_unordered_or_edge_touching_subjects():
    """Two subjects' bounding squares stay >= MIN_GAP apart, subjects are listed left to right, and every
    subject stays EDGE_MARGIN px inside the image on all four sides."""
    s = world.SubjectSpec

    def scene(*subjects):
        return world.SceneSpec(subjects, "grey")

    # 12-px squares centred at x 14 and 28: boxes [8, 20] and [22, 34], 2 px apart
    with pytest.raises(ValueError, match="closer than"):
        world.validate_spec(scene(s("red", "square", "left", 12, 14, 32), s("blue", "square", "centre", 12, 28, 32)))
    world.validate_spec(scene(s("red", "square", "left", 12, 14, 32), s("blue", "square", "centre", 12, 30, 32)))  # 4 px
    with pytest.raises(ValueError, match="left to right"):
        world.validate_spec(scene(s("blue", "square", "centre", 12, 32, 32), s("red", "square", "left", 12, 11, 32)))
    # an 18-px subject centred at 54 reaches x = 63 (> 64 - 2); at 53 it ends exactly at the margin
    with pytest.raises(ValueError, match="edge"):
        world.validate_spec(world.SceneSpec((s("red", "circle", "right", 18, 54, 32),), "grey"))
    with pytest.raises(ValueError, match="edge"):
        world.validate_spec(world.SceneSpec((s("red", "circle", "centre", 18, 32, 54),), "grey"))
    world.validate_spec(world.SceneSpec((s("red", "circle", "right", 18, 53, 53),), "grey"))


def test_coverage_of_an_integer_square_is_exact_and_half_covered_pixels_are_in_the_mask():
    """Sample points never fall on the edge of an integer-sized, integer-centred subject: a 12-px square
    covers exactly 144 whole pixels. A 13-px square's edge pixels are covered exactly half, and
    masks are coverage >= 0.5."""
    cov = world.subject_coverage("square", 32, 32, 12)  # [64, 64]
    assert cov.sum() == 144 and set(np.unique(cov)) == {0.0, 1.0}
    assert cov[26:38, 26:38].min() == 1.0
    odd = world.SceneSpec((world.SubjectSpec("red", "square", "centre", 13, 32, 32),), "grey")
    scene = world.render_scene(odd)
    # the square spans [25.5, 38.5): pixel 25 and pixel 38 are half inside
    assert scene.coverage[0, 32, 25] == 0.5 and scene.coverage[0, 32, 38] == 0.5
    assert scene.masks[0, 32, 25] and scene.masks[0, 32, 38]
    assert scene.masks[0].sum() == 12 * 12 + 4 * 12  # interior + half-covered edges; the 4 corners are 1/4 covered


def test_load_scenes_honours_start_and_subject_count():
    """nano_data.load_scenes(split, count, start, num_subjects): scenes start..start+count-1 of the split's
    stream, with the requested number of subjects, rendered as world.render_scene renders them."""
    import torch

    from train.nano import nano_data

    batch = nano_data.load_scenes("train", 3, start=5)
    assert batch.specs == [world.spec_at(world.TRAIN_SEED, i) for i in (5, 6, 7)]
    assert batch.images.shape == (3, 3, 64, 64) and batch.images.dtype == torch.uint8  # [N, 3, H, W]
    for image, spec in zip(batch.images, batch.specs):
        assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(world.render_scene(spec).image))
    for subjects in (1, 2):
        held = nano_data.load_scenes("heldout", 6, num_subjects=subjects)
        assert all(len(s.subjects) == subjects for s in held.specs)
        assert all(world.split_of(s) == "heldout" for s in held.specs)
