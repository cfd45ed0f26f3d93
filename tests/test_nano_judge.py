"""The nano judge: reads world scenes back, accurately and deterministically."""

import numpy as np
import pytest

from train.nano import judge, world


def test_judge_accuracy_on_heldout_scenes_is_at_least_098_per_attribute():
    res = judge.measure_judge_accuracy(300, world.HELDOUT_SEED)
    for attr in ("count", "colour", "shape", "position", "subject_colour", "subject_shape", "subject_position"):
        assert res[attr] >= 0.98, (attr, res)
    assert res["samples"] == 300


def test_judge_tolerates_noise_and_mild_blur():
    # Generated images are imperfect; the judge should still read most of them.
    noisy = judge.measure_judge_accuracy(80, world.HELDOUT_SEED, noise_sigma=0.05)
    blurred = judge.measure_judge_accuracy(80, world.HELDOUT_SEED, blur_radius=1.0, noise_sigma=0.03)
    assert noisy["all_correct"] >= 0.95, noisy
    assert blurred["all_correct"] >= 0.95, blurred


@pytest.mark.parametrize("background", list(world.BACKGROUNDS))
def test_judge_reads_every_colour_and_shape_back_exactly(background):
    rng = np.random.default_rng(7)
    for i, colour in enumerate(world.COLOURS):
        for j, shape in enumerate(world.SHAPES):
            position = world.POSITIONS[(i + j) % 3]
            spec = world.make_spec(rng, [(colour, shape, position)], background)
            (reading,) = judge.judge_image(world.render_scene(spec).image)
            s = spec.subjects[0]
            assert (reading.colour, reading.shape, reading.position) == (colour, shape, position)
            assert abs(reading.centre[0] - s.cx) < 1.5
            assert 0.4 * s.size**2 < reading.area <= 1.01 * s.size**2


def test_judge_reads_a_requested_two_subject_layout():
    rng = np.random.default_rng(11)
    spec = world.make_spec(rng, [("purple", "triangle", "centre"), ("yellow", "cross", "right")], "white")
    scene = world.render_scene(spec)
    readings = judge.judge_image(scene.image)
    assert [(r.colour, r.shape, r.position) for r in readings] == [("purple", "triangle", "centre"), ("yellow", "cross", "right")]
    res = judge.score_against(scene.image, scene.labels)
    assert res["all_correct"] and res["count"]
    # Labels as a caption's (colour, shape, position) tuples score the same.
    subjects, _ = world.parse_caption(scene.caption)
    assert judge.score_against(scene.image, subjects)["all_correct"]


def test_score_against_catches_each_wrong_attribute():
    rng = np.random.default_rng(5)
    scene = world.render_scene(world.make_spec(rng, [("red", "circle", "left"), ("blue", "square", "right")], "grey"))
    right = [("red", "circle", "left"), ("blue", "square", "right")]
    assert judge.score_against(scene.image, right)["all_correct"]
    wrong_colour = judge.score_against(scene.image, [("green", "circle", "left"), ("blue", "square", "right")])
    assert not wrong_colour["colour"] and wrong_colour["shape"] and wrong_colour["position"] and not wrong_colour["all_correct"]
    wrong_shape = judge.score_against(scene.image, [("red", "circle", "left"), ("blue", "cross", "right")])
    assert wrong_shape["colour"] and not wrong_shape["shape"] and not wrong_shape["all_correct"]
    wrong_pos = judge.score_against(scene.image, [("red", "circle", "left"), ("blue", "square", "centre")])
    assert not wrong_pos["position"] and wrong_pos["colour"] and not wrong_pos["all_correct"]
    missing = judge.score_against(scene.image, [("red", "circle", "left")])
    assert not missing["count"] and not missing["all_correct"]
    extra = judge.score_against(scene.image, right + [("yellow", "triangle", "centre")])
    assert not extra["count"] and not extra["colour"] and not extra["all_correct"]


@pytest.mark.parametrize("background", list(world.BACKGROUNDS))
def test_blank_background_has_no_subjects(background):
    blank = np.broadcast_to(np.array(world.BACKGROUNDS[background], dtype=np.uint8), (64, 64, 3)).copy()
    assert judge.judge_image(blank) == []
    noisy = judge.degrade(blank, np.random.default_rng(0), noise_sigma=0.05)
    assert judge.judge_image(noisy) == []
    res = judge.score_against(blank, [("red", "circle", "left")])
    assert not res["count"] and not res["all_correct"]


def test_judge_is_deterministic_and_accepts_float_and_other_sizes():
    scene = next(world.scenes(world.HELDOUT_SEED, 1, start=17))
    a = judge.judge_image(scene.image)
    b = judge.judge_image(scene.image.copy())
    assert a == b
    as_float = judge.judge_image(scene.image.astype(np.float32) / 255.0)
    assert as_float == a
    big = np.repeat(np.repeat(scene.image, 2, 0), 2, 1)  # 128 x 128
    assert [(r.colour, r.shape, r.position) for r in judge.judge_image(big)] == [(r.colour, r.shape, r.position) for r in a]
    assert judge.measure_judge_accuracy(20, noise_sigma=0.05) == judge.measure_judge_accuracy(20, noise_sigma=0.05)


def test_bad_images_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        judge.judge_image(np.zeros((64, 64), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        judge.judge_image(np.full((64, 64, 3), -1.0, dtype=np.float32))
    with pytest.raises(ValueError, match="dtype"):
        judge.judge_image(np.zeros((64, 64, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="label"):
        judge.score_against(np.zeros((64, 64, 3), dtype=np.uint8), [("red", "circle")])


def test_label_components_counts_8_connected_regions():
    mask = np.zeros((10, 10), dtype=bool)
    mask[1:3, 1:3] = True
    mask[3, 3] = True  # touches the first block diagonally: same component
    mask[6:9, 6] = True
    mask[0, 9] = True
    labels, n = judge.label_components(mask)
    assert n == 3
    # Numbered 1..n in raster order of each component's first pixel.
    assert labels[0, 9] == 1 and labels[1, 1] == labels[3, 3] == 2 and labels[6, 6] == labels[8, 6] == 3
    assert (labels[~mask] == 0).all()


def test_cli_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "judge.json"
    assert judge.main(["--samples", "10", "--clean-only", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "clean" in printed and "all_correct" in printed
    import json

    data = json.loads(out.read_text())
    assert data["clean"]["samples"] == 10 and 0.0 <= data["clean"]["all_correct"] <= 1.0
