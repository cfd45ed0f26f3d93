"""train.data: construction with tiny random transformers models, ingestion, mixing, official TSV."""

from __future__ import annotations

import base64
import dataclasses
import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from kosmosg_core.files import HOST_TAG, TEMP_PREFIX
from train.data import cli
from train.data.build import run_build
from train.data.config import BuildConfig, CropConfig, IngestConfig, MixConfig, OfficialConfig
from train.data.crops import entity_crops
from train.data.entities import (converter_tags, filter_entities, layout_interleaved, order_entities,
                                 parse_entity_answer, place_entities)
from train.data.ingest import run_ingest_ip2p, run_ingest_pairs
from train.data.mix import run_mix
from train.data.official_tsv import run_from_official, run_to_official
from train.data.samples import ip2p_sample, laion_sample
from train.data.shards import read_samples, write_shard
from train.data.sources import EntityLabel, Scene

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a dog on the red mat", "a cat with a hat", "the car and a tree", "a dog and a cat on grass",
            "a ball on the mat", None, "a red car"]  # None: no caption file -> the captioner is used


def remove_spans(text: str, spans: list[list[int]]) -> str:
    """`text` without its [start, end) character spans (a sample's drop_spans must give its text_dropped)."""
    out, pos = [], 0
    for start, end in sorted(spans):
        out.append(text[pos:start])
        pos = end
    return "".join(out) + text[pos:]


def _noise_image(rng, height=48, width=64):
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _tar_bytes(folder):
    return {name: open(os.path.join(folder, name), "rb").read()
            for name in sorted(os.listdir(folder)) if name.endswith(".tar")}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from support.tiny_hf_models import save_all

    return save_all(str(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        _noise_image(rng).save(folder / f"img{i}.png")
        if caption:
            (folder / f"img{i}.txt").write_text(caption)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    return str(folder)


def _build_config(models, folder, output, captioner=True):
    config = BuildConfig(input=folder, output=output, samples_per_shard=3, seed=7)
    config.models.captioner = models["captioner"] if captioner else None
    config.models.entity_model = models["entity_model"]
    config.models.segmenter = models["segmenter"]
    config.models.device = "cpu"
    config.models.caption_max_new_tokens = 6
    config.crop.entity_size = config.crop.target_size = 32
    return config


@pytest.fixture(scope="module")
def built(tiny_models, image_folder, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("built"))
    summary = run_build(_build_config(tiny_models, image_folder, output))
    return output, summary


# ---- pure parts ---------------------------------------------------------------------------------

def test_entity_parsing_and_official_filters():
    answer = "1. Dog\n- dog collar, red, and ball; the, a sentence that is far too long to be a noun ### Input: x"
    assert parse_entity_answer(answer) == ["Dog", "dog collar", "red", "ball"]
    caption = "a dog with a dog collar chasing a red ball"
    # "dog" occurs inside "dog collar" (ambiguous), "red" is a colour word, "cat" is not in the caption
    assert filter_entities(["dog", "dog collar", "red", "ball", "cat"], caption) == ["dog collar", "ball"]
    # the official ambiguity test is case-sensitive: "Dog" is not found inside "dog collar"
    assert filter_entities(["Dog", "dog collar", "red", "ball", "cat"], caption) == ["Dog", "dog collar", "ball"]
    # the converter stores only tags found in the caption as written, so one absent from it makes no other ambiguous
    assert converter_tags(["dog", "dog red red", "Dog", ""], "a dog on a mat") == ["dog"]
    # the loader counts ambiguity over every stored tag, whole word of the caption or not (found by a review)
    assert converter_tags(["dog", "hot dog"], "a dog next to two hot dogs") == ["dog", "hot dog"]
    assert filter_entities(["dog", "hot dog"], "a dog next to two hot dogs") == []


def test_layout_matches_official_segments_and_drop_spans():
    layout = layout_interleaved("a cat's toy and (dog) sleep", ["dog", "toy", "cat"])
    assert layout.entities == ["cat", "toy", "dog"]  # ordered by position in the caption
    # keep: text through the end of the word (next delimiter) plus one space, then the image
    assert layout.text == "a cat's <i> toy <i> and (dog <i>) sleep"
    # drop: text up to the word, a space added only when the text does not end in one
    assert layout.text_dropped == "a <i> <i> and ( <i>) sleep"
    assert remove_spans(layout.text, layout.drop_spans) == layout.text_dropped
    start = layout_interleaved("dog on mat", ["dog", "mat"])
    assert start.text == "dog <i> on mat <i>" and start.text_dropped == "<i> on <i>"
    assert remove_spans(start.text, start.drop_spans) == start.text_dropped


def test_entity_crops_follow_official_recipe():
    pixels = np.full((100, 100, 3), 90, dtype=np.uint8)
    image = Image.fromarray(pixels)
    probabilities = np.zeros((100, 100), dtype=np.float32)
    probabilities[10:30, 50:90] = 0.9  # big region, 20 x 40
    probabilities[80:84, 5:9] = 0.9  # small region, dropped
    probabilities[0:5, 0:5] = 0.2  # below threshold
    crop, masked = entity_crops(image, probabilities, threshold=0.3, dilation_divisor=100, size=40)
    assert crop.size == masked.size == (40, 40)
    masked = np.asarray(masked)
    # square of side 40 around the region: rows 0..40 (shifted inside), the region's rows are 10..30
    assert (masked[:8] == 255).all() and (masked[32:] == 255).all()  # outside the region -> white
    assert (np.asarray(crop) == 90).all()  # the plain crop keeps the pixels
    assert entity_crops(image, np.zeros((100, 100), np.float32)) is None


def test_entity_answer_cut_at_the_next_section_four_word_tags_and_duplicates():
    """An answer is cut at a following "### ..." section, a tag of exactly max_words words is kept,
    and a tag repeated as written is kept once (case variants are other tags)."""
    assert parse_entity_answer("dog, ball\n### Input:\ncat on a mat") == ["dog", "ball"]
    assert parse_entity_answer("big red fire truck, ball", max_words=4) == ["big red fire truck", "ball"]
    assert parse_entity_answer("big red fire truck, ball", max_words=3) == ["ball"]
    assert parse_entity_answer("Dog, dog, dog, cat") == ["Dog", "dog", "cat"]
    # found by a review: "Dog" kept for "dog" left the caption's "dog" to the converter's case-sensitive test
    assert converter_tags(parse_entity_answer("Dog, dog, mat"), "a dog on a mat") == ["dog", "mat"]


def test_entity_filters_are_the_official_loaders_own_tests():
    """A tag must be a whole word of the caption, in any case ("cat" is not in "category"); colour words are
    the official lower-case list compared exactly ("Red" stays); a tag named twice is ambiguous; the ambiguity
    test reads the tag as a regular expression ("a.b" is found in "axb") and a tag that is not one makes the
    official loader skip the line (no tag kept)."""
    assert filter_entities(["cat", "chart"], "a category chart") == ["chart"]
    assert layout_interleaved("a category chart", ["cat"]).entities == []
    assert filter_entities(["Red", "green", "ball"], "a Red ball on green grass") == ["Red", "ball"]
    assert filter_entities(["dog", "dog", "cat"], "a dog and a cat") == ["cat"]
    assert filter_entities(["a.b", "axb"], "an a.b and an axb") == ["axb"]
    assert filter_entities(["dog)", "cat"], "the dog)s and a cat") == []


def test_layout_orders_case_variants_as_the_official_loader_and_a_repeated_tag_by_its_own_mentions():
    """The official loader sorts every tag by its first match: "Dog" and "dog" both sort there, so "cat"
    (between the two mentions) comes after both and finds no mention left. A tag given twice (two entities of
    one name in a labelled scene) takes the first and then the second mention."""
    caption = "a dog and a cat and a dog"
    assert order_entities(["Dog", "dog", "cat"], caption) == ["Dog", "dog", "cat"]
    assert layout_interleaved(caption, ["Dog", "dog", "cat"]).entities == ["Dog", "dog"]
    assert order_entities(["dog", "cat", "dog"], caption) == ["dog", "cat", "dog"]
    assert order_entities(["dog", "dog", "dog", "cat"], caption) == ["dog", "cat", "dog", "dog"]
    # a placed mention consumes its whole word ("dog-dog"): the second dog sorts at the next mention after it
    assert place_entities("dog-dog cat dog", order_entities(["dog", "dog", "cat"], "dog-dog cat dog")).entities == \
        ["dog", "cat", "dog"]


def test_entity_crop_threshold_dilation_and_image_edge():
    """The official crop recipe on hand-made masks [H, W]: probabilities at or below the threshold are
    not the entity, dilation by min(H, W) // 100 joins pieces split by a thin seam (but not wider gaps),
    and a square that would leave the image is shifted back inside it."""
    # a big faint blob (0.2) and a small confident entity (0.9): the crop is around the entity
    pixels = np.full((100, 100, 3), 90, dtype=np.uint8)
    pixels[70:80, 70:80] = (255, 0, 0)
    probabilities = np.zeros((100, 100), dtype=np.float32)
    probabilities[5:55, 5:55] = 0.2
    probabilities[70:80, 70:80] = 0.9
    crop, masked = entity_crops(Image.fromarray(pixels), probabilities, threshold=0.3, size=10)
    assert (np.asarray(crop) == (255, 0, 0)).all()

    def split_entity(height, width, gap):
        """A red and a blue half of one entity, `gap` columns apart -> colours seen in the masked crop."""
        pixels = np.full((height, width, 3), 90, dtype=np.uint8)
        probabilities = np.zeros((height, width), dtype=np.float32)
        left = width // 2 - 30
        pixels[140:160, left:left + 28] = (255, 0, 0)  # the bigger piece
        pixels[140:160, left + 28 + gap:left + 48 + gap] = (0, 0, 255)
        probabilities[140:160, left:left + 48 + gap] = 0.9
        probabilities[:, left + 28:left + 28 + gap] = 0.0
        _, masked = entity_crops(Image.fromarray(pixels), probabilities, threshold=0.3, size=64)
        colours = np.asarray(masked).reshape(-1, 3).astype(int)
        return {name for name, rgb in (("red", (255, 0, 0)), ("blue", (0, 0, 255)))
                if (np.abs(colours - rgb).max(-1) < 10).any()}

    assert split_entity(300, 300, gap=2) == {"red", "blue"}  # dilation 3 closes a 2-px seam
    assert split_entity(300, 1000, gap=4) == {"red"}  # window from the shorter side (3), not the longer (10)

    # an entity on the bottom edge: the square is the image's last rows, not a window past the edge
    rows = np.repeat(np.arange(100, dtype=np.uint8)[:, None], 100, axis=1)
    gradient = np.stack([rows, rows, rows], axis=-1)  # [H, W, 3], value = row index
    probabilities = np.zeros((100, 100), dtype=np.float32)
    probabilities[90:100, 10:50] = 0.9  # 10 x 40: square of side 40 centred on row 95 -> rows 60..100
    crop, _ = entity_crops(Image.fromarray(gradient), probabilities, threshold=0.3, size=40)
    assert np.array_equal(np.asarray(crop), gradient[60:100, 10:50])


def test_center_square_and_shorter_side_resize():
    """The square crop is the centred one; the shorter side goes to `size` for portrait and landscape."""
    from train.data.crops import center_square, resize_shorter_side

    columns = np.repeat(np.arange(60, dtype=np.uint8)[None], 40, axis=0)  # [H=40, W=60], value = column
    square = np.asarray(center_square(Image.fromarray(columns)))
    assert square.shape == (40, 40) and (square[0] == np.arange(10, 50)).all()
    assert center_square(Image.new("RGB", (30, 50))).size == (30, 30)
    assert resize_shorter_side(Image.new("RGB", (40, 60)), 20).size == (20, 30)  # portrait
    assert resize_shorter_side(Image.new("RGB", (60, 40)), 20).size == (30, 20)  # landscape


# ---- build --------------------------------------------------------------------------------------

def test_build_writes_valid_shards_and_counts_the_corrupt_image(built, image_folder):
    output, summary = built
    tars = _tar_bytes(output)
    assert sorted(tars) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]  # 8 items, 3 per shard
    for name in tars:
        with tarfile.open(os.path.join(output, name)) as archive:  # valid tar
            assert all(member.mtime == 0 for member in archive.getmembers())
    assert summary["processed"] == 8 and summary["skipped_corrupt"] == 1
    assert summary["failed_caption"] == 0  # the uncaptioned image went through the captioner
    outcomes = {k: v for k, v in summary.items() if k not in ("processed", "shards", "this_run")}
    assert sum(outcomes.values()) == 8
    assert json.load(open(os.path.join(output, "summary.json")))["skipped_corrupt"] == 1

    samples = list(read_samples(output))
    assert len(samples) == summary["written"] >= 1
    for sample in samples:
        meta = sample.meta
        assert meta["kind"] == "openimage" and meta["format"] == "kosmosg-data"
        assert meta["text"].count("<i>") == len(meta["entities"]) >= 1
        assert remove_spans(meta["text"], meta["drop_spans"]) == meta["text_dropped"]
        assert meta["text"].replace("<i>", "").replace(" ", "") == meta["caption"].replace(" ", "")
        for k, entity in enumerate(meta["entities"]):
            assert entity["name"].lower() in meta["caption"].lower()
            assert entity["image"] == f"entity_{k}.png" and entity["masked"] == f"entity_{k}_masked.png"
            assert Image.open(io.BytesIO(sample.images[entity["masked"]])).size == (32, 32)
        assert Image.open(io.BytesIO(sample.images["target.png"])).size == (32, 32)
        assert "broken" not in sample.key


def test_build_without_captioner_counts_failed_caption(tiny_models, image_folder, tmp_path):
    summary = run_build(_build_config(tiny_models, image_folder, str(tmp_path), captioner=False))
    assert summary["failed_caption"] == 1 and summary["skipped_corrupt"] == 1


def test_build_is_deterministic_and_resumes_per_shard(built, tiny_models, image_folder, tmp_path):
    output, _ = built
    reference = _tar_bytes(output)
    copy = str(tmp_path / "copy")
    shutil.copytree(output, copy)
    os.remove(os.path.join(copy, "shard-000001.tar"))
    leftover = os.path.join(copy, f"{TEMP_PREFIX}4194305-{HOST_TAG}-0badf00d.tmp")  # a killed writer's (pid > pid_max)
    open(leftover, "wb").write(b"half a shard")
    summary = run_build(_build_config(tiny_models, image_folder, copy))
    assert not os.path.exists(leftover)
    assert summary["this_run"]["shards_written"] == 1 and summary["this_run"]["shards_skipped_complete"] == 2
    assert _tar_bytes(copy) == reference  # byte-identical
    fresh = str(tmp_path / "fresh")
    run_build(_build_config(tiny_models, image_folder, fresh))
    assert _tar_bytes(fresh) == reference  # same input + seed -> same bytes


class FakeWorld:
    """A label source: two coloured squares per scene with exact masks (stands in for the nano world)."""

    def __init__(self, seed=0, count=0, size=40):
        self.seed, self.count, self.size = seed, count, size

    def __len__(self):
        return self.count

    def scene(self, index):
        if index == 2:
            raise RuntimeError("renderer hiccup")
        rng = np.random.default_rng([self.seed, index])
        pixels = np.full((self.size, self.size, 3), 128, dtype=np.uint8)
        masks = []
        for colour in ((255, 0, 0), (0, 0, 255)):
            top, left = rng.integers(0, self.size - 12, size=2)
            mask = np.zeros((self.size, self.size), dtype=bool)
            mask[top:top + 10, left:left + 10] = True
            pixels[mask] = colour
            masks.append(mask)
        return Scene(key="ignored", image=Image.fromarray(pixels), caption="a cube next to a ball",
                     entities=[EntityLabel("cube", masks[0]), EntityLabel("ball", masks[1])])


def test_build_from_label_source(tmp_path):
    config = BuildConfig(output=str(tmp_path), source="test_train_data:FakeWorld", count=4, seed=3,
                         samples_per_shard=2, source_options={"size": 40})
    config.crop.entity_size = 16
    config.crop.target_size = 40
    summary = run_build(config)
    assert summary["written"] == 3 and summary["failed_labels"] == 1
    sample = next(iter(read_samples(str(tmp_path))))
    assert sample.meta["text"] == "a cube <i> next to a ball <i>"
    cube = np.asarray(Image.open(io.BytesIO(sample.images["entity_0_masked.png"])))
    # the masked cube crop is the red square on white: no grey background survives
    assert (np.abs(cube.astype(int) - 128).sum(-1) > 60).mean() > 0.9


class SceneSource:
    """A test label source: `count` scenes, each made by the subclass's `scene(index)`."""

    def __init__(self, seed=0, count=0):
        self.count = count

    def __len__(self):
        return self.count


def build_scenes(output, source: str, entity_size: int = 8):
    """`build` of one scene from a label source of this module -> its sample."""
    config = BuildConfig(output=str(output), source=f"test_train_data:{source}", count=1, samples_per_shard=1)
    config.crop.entity_size = entity_size
    config.crop.target_size = 40
    assert run_build(config)["written"] == 1
    return next(iter(read_samples(str(output))))


class TwoDogWorld(SceneSource):
    """A label source naming two entities alike: three dogs (red, green, blue squares with exact masks) and a
    cat (white) in a caption that mentions a dog, the cat, then a dog."""

    COLOURS = {"dog": [(255, 0, 0), (0, 255, 0), (0, 0, 255)], "cat": [(255, 255, 255)]}

    def scene(self, index):
        pixels = np.full((40, 40, 3), 128, dtype=np.uint8)
        entities = []
        for slot, (name, colour) in enumerate([("dog", 0), ("cat", 0), ("dog", 1), ("dog", 2)]):
            mask = np.zeros((40, 40), dtype=bool)
            mask[2 + 9 * slot:9 + 9 * slot, 2:9] = True
            pixels[mask] = self.COLOURS[name][colour]
            entities.append(EntityLabel(name, mask))
        return Scene(key="ignored", image=Image.fromarray(pixels), caption="a dog near a cat and a dog",
                     entities=entities)


def test_build_places_entities_of_one_name_at_their_own_mentions(tmp_path):
    """Two entities of one name are not one ambiguous tag: the first dog's crop goes after the first "dog",
    the cat's after "cat", the second dog's after the second "dog"; the third dog has no mention left and is
    left out (before: one dog, with the last dog's crop)."""
    built = tmp_path / "built"
    sample = build_scenes(built, "TwoDogWorld")
    assert sample.meta["text"] == "a dog <i> near a cat <i> and a dog <i>"
    palette = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}  # the cat's crop is all white
    found = []
    for k in range(3):
        masked = np.asarray(Image.open(io.BytesIO(sample.images[f"entity_{k}_masked.png"]))).reshape(-1, 1, 3)
        near = np.abs(masked.astype(int) - np.array(list(palette.values()))).max(-1) < 40  # [pixels, colours]
        found.append([name for name, count in zip(palette, near.sum(0)) if count > 0])
    assert found == [["red"], [], ["green"]]
    # the official format names entities by their word: its loader drops a tag stored twice (found by a review)
    official = tmp_path / "official"
    assert run_to_official(OfficialConfig(input=str(built), output=str(official)))["repeated_entity_names"] == 1
    back = tmp_path / "back"
    run_from_official(OfficialConfig(input=str(official), output=str(back)))
    assert [e["name"] for e in next(iter(read_samples(str(back)))).meta["entities"]] == ["cat"]


class CollarWorld(SceneSource):
    """A dog with a mask and a "dog collar" whose mask is empty, in "a dog with a dog collar"."""

    def scene(self, index):
        pixels = np.full((40, 40, 3), 128, dtype=np.uint8)
        dog = np.zeros((40, 40), dtype=bool)
        dog[5:20, 5:20] = True
        pixels[dog] = (255, 0, 0)
        return Scene(key="ignored", image=Image.fromarray(pixels), caption="a dog with a dog collar",
                     entities=[EntityLabel("dog", dog), EntityLabel("dog collar", np.zeros((40, 40), dtype=bool))])


def test_only_tags_with_a_crop_are_stored_and_make_others_ambiguous(tmp_path):
    """Found by a review: as the official converter stores only tags with a crop, a "dog collar" without one does
    not make "dog" ambiguous (both were dropped: the loader's filter ran before the crops)."""
    assert build_scenes(tmp_path, "CollarWorld").meta["text"] == "a dog <i> with a dog collar"


class WideWorld(SceneSource):
    """A label source of wide scenes [H=40, W=60]: one red square with its exact mask, right of centre."""

    def scene(self, index):
        pixels = np.full((40, 60, 3), 128, dtype=np.uint8)
        mask = np.zeros((40, 60), dtype=bool)
        mask[15:25, 35:45] = True  # inside the centred 40 x 40 square (columns 10..50)
        pixels[mask] = (255, 0, 0)
        return Scene(key="ignored", image=Image.fromarray(pixels), caption="a cube", entities=[EntityLabel("cube", mask)])


def test_build_square_crop_crops_the_masks_with_the_image(tmp_path):
    """With square_crop a wide scene and its masks are cut to the same centred square: the entity crop
    is the red square, and the target the centred 40 x 40."""
    sample = build_scenes(tmp_path, "WideWorld", entity_size=16)
    masked = np.asarray(Image.open(io.BytesIO(sample.images["entity_0_masked.png"]))).astype(int)
    assert (np.abs(masked - (255, 0, 0)).max(-1) < 40).mean() > 0.5  # mostly the red square
    target = np.asarray(Image.open(io.BytesIO(sample.images["target.png"])))
    assert target.shape == (40, 40, 3) and (target[15:25, 25:35] == (255, 0, 0)).all()


def test_build_refuses_a_mask_threshold_of_zero_or_one(tmp_path):
    """0 would make every pixel the entity and 1 none: both are refused by name before anything runs."""
    for threshold in (0.0, 1.0):
        with pytest.raises(ValueError, match="crop.mask_threshold"):
            run_build(BuildConfig(source="test_train_data:WideWorld", count=1, output=str(tmp_path / "o"),
                                  crop=CropConfig(mask_threshold=threshold)))
    assert not os.path.exists(tmp_path / "o")


def test_nano_world_source_streams_the_seeds_own_split_and_crop_kinds():
    """split=auto: the held-out seed streams held-out scenes (never training ones); the `crop` of an
    entity is the scene window, its `masked` crop the subject on white."""
    from train.data.nano_labels import NanoWorldLabelSource
    from train.nano import world

    source = NanoWorldLabelSource(world, seed=world.HELDOUT_SEED, count=3)
    assert source.split == "heldout"
    for index in range(3):
        split, seed, i = source.scene(index).origin.split(":")[1:]
        assert world.split_of(world.spec_at(int(seed), int(i), None, split)) == "heldout"
    assert NanoWorldLabelSource(world, seed=world.TRAIN_SEED, count=1).split == "train"
    white = tuple(world.BACKGROUNDS["white"])
    scenes = [NanoWorldLabelSource(world, seed=5, count=8).scene(i) for i in range(8)]
    coloured = [s for s in scenes if tuple(np.asarray(s.image)[0, 0]) != white]
    assert coloured, "no scene with a non-white background in the first 8"
    for scene in coloured:
        background = tuple(np.asarray(scene.image)[0, 0])
        for entity in scene.entities:
            assert tuple(np.asarray(entity.masked)[0, 0]) == white  # subject on white
            assert tuple(np.asarray(entity.crop)[0, 0]) == background  # the scene around it


def test_recaption_captions_images_that_come_with_a_caption(tiny_models):
    """models.recaption: a given caption is kept by default and replaced by the captioner's when set."""
    from train.data.build import ModelLabeller

    config = _build_config(tiny_models, "unused", "unused")
    labeller = ModelLabeller(config)
    image = _noise_image(np.random.default_rng(9), 32, 32)
    assert labeller.caption(image, "a  given\tcaption", "k") == "a given caption"
    config.models.recaption = True
    generated = labeller.caption(image, None, "k")
    assert generated != "a given caption"
    assert labeller.caption(image, "a given caption", "k") == generated


# ---- ingestion ----------------------------------------------------------------------------------

def test_ingest_ip2p_both_layouts(tmp_path):
    rng = np.random.default_rng(1)
    release = tmp_path / "release"
    (release / "0001").mkdir(parents=True)
    (release / "0001" / "prompt.json").write_text(json.dumps({"input": "a house", "edit": "make it snowy"}))
    for seed in (11, 12):
        _noise_image(rng, 40, 60).save(release / "0001" / f"{seed}_0.jpg")
        _noise_image(rng, 40, 60).save(release / "0001" / f"{seed}_1.jpg")
    (release / "seeds.json").write_text(json.dumps([["0001", [11, 12]]]))
    config = IngestConfig(input=str(release), output=str(tmp_path / "out1"), image_size=20)
    assert run_ingest_ip2p(config)["written"] == 1
    sample = next(iter(read_samples(config.output)))
    assert sample.meta["text"] == "a house<i>make it snowy" and sample.meta["text_dropped"] == "<i>make it snowy"
    assert sample.meta["variants"] == 1 and "variant_1_target.png" in sample.images
    assert Image.open(io.BytesIO(sample.images["target.png"])).size == (30, 20)  # shorter side 20

    jsonl_dir = tmp_path / "jsonl"
    jsonl_dir.mkdir()
    _noise_image(rng).save(jsonl_dir / "s.png")
    _noise_image(rng).save(jsonl_dir / "t.png")
    (jsonl_dir / "bad.png").write_bytes(b"garbage")
    lines = [{"input_caption": "a cat", "edit": "add a hat", "source": "s.png", "edited": "t.png"},
             {"input_caption": "a dog", "edit": "paint it", "source": "bad.png", "edited": "t.png"}]
    (jsonl_dir / "triplets.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    summary = run_ingest_ip2p(IngestConfig(input=str(jsonl_dir), output=str(tmp_path / "out2"), image_size=0))
    assert summary["written"] == 1 and summary["skipped_corrupt"] == 1


def test_ingest_pairs_folder(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "pairs"
    folder.mkdir()
    for i in range(4):
        _noise_image(rng).save(folder / f"p{i}.jpg")
        if i != 3:
            (folder / f"p{i}.txt").write_text(f"caption number {i}\n")
    (folder / "zz.png").write_bytes(b"nope")
    (folder / "zz.txt").write_text("a caption for a broken file")
    summary = run_ingest_pairs(IngestConfig(input=str(folder), output=str(tmp_path / "out"), image_size=24))
    assert (summary["written"], summary["missing_caption"], summary["skipped_corrupt"]) == (3, 1, 1)
    samples = list(read_samples(str(tmp_path / "out")))
    assert [s.meta["caption"] for s in samples] == ["caption number 0", "caption number 1", "caption number 2"]
    assert all(s.meta["kind"] == "laion" and s.meta["entities"] == [] for s in samples)


def test_captions_lose_byte_order_marks_control_characters_and_image_placeholders(tmp_path):
    """A UTF-8 BOM (Windows editors), NUL / other control characters and a literal `<i>` (HTML italics in scraped
    alt text) were kept in captions: the BOM and NUL went to the tokenizer, and `<i>` made a sample whose text has
    more image placeholders than images, which every stage then skipped."""
    rng = np.random.default_rng(4)
    folder = tmp_path / "pairs"
    folder.mkdir()
    captions = {"bom": "\ufeffa dog on a mat".encode("utf-8"), "nul": b"a dog\x00 on\x0b a mat",
                "italics": b"a <i>Rosa canina</i> flower", "weighted": b"a <i:0.5>small</i> dog",
                "nested": b"a <i:<i>>tall</i> dog"}  # removing the inner <i> leaves <i: >: removed too
    for name, caption in captions.items():
        _noise_image(rng).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_bytes(caption)
    _noise_image(rng).save(folder / "listed.png")
    run_ingest_pairs(IngestConfig(input=str(folder), output=str(tmp_path / "out"), image_size=16))
    assert sorted(s.meta["text"] for s in read_samples(str(tmp_path / "out"))) == [
        "a Rosa canina</i> flower", "a dog on a mat", "a dog on a mat", "a small</i> dog", "a tall</i> dog"]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"image": "pairs/listed.png", "caption": "a listed dog"}\n', encoding="utf-8-sig")
    run_ingest_pairs(IngestConfig(input=str(jsonl), output=str(tmp_path / "out2"), image_size=16))
    assert [s.meta["caption"] for s in read_samples(str(tmp_path / "out2"))] == ["a listed dog"]


def test_captions_that_are_not_utf8_are_counted_and_named_not_garbled(tmp_path, caplog):
    """A Latin-1 caption (sidecar .txt or a shard's txt) was decoded with replacement characters and written
    garbled; a shard's json member that is not UTF-8 ended the whole run (UnicodeDecodeError). Now a caption that
    cannot be read is `unreadable_caption`, named in a warning; unreadable json is just no caption."""
    rng = np.random.default_rng(6)
    folder = tmp_path / "pairs"
    folder.mkdir()
    for name, caption in (("good", "a caf\u00e9 dog".encode("utf-8")), ("latin1", "a caf\u00e9 dog".encode("latin-1"))):
        _noise_image(rng).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_bytes(caption)
    with caplog.at_level("WARNING"):
        summary = run_ingest_pairs(IngestConfig(input=str(folder), output=str(tmp_path / "out"), image_size=16))
    assert (summary["written"], summary["unreadable_caption"]) == (1, 1)
    assert [s.meta["caption"] for s in read_samples(str(tmp_path / "out"))] == ["a caf\u00e9 dog"]
    assert "caption file latin1.txt cannot be read" in caplog.text and "save it as UTF-8 text" in caplog.text
    shard = tmp_path / "raw.tar"
    with tarfile.open(shard, "w") as tar:
        for name, payload in (("a.jpg", _png(_noise_image(rng))), ("a.txt", "caf\u00e9".encode("latin-1")),
                              ("b.jpg", _png(_noise_image(rng))), ("b.json", b'{"caption": "caf\xe9"}')):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    summary = run_ingest_pairs(IngestConfig(input=str(shard), output=str(tmp_path / "out2"), image_size=16))
    assert (summary["unreadable_caption"], summary["missing_caption"]) == (1, 1)


def test_build_recaptions_an_image_whose_caption_file_cannot_be_read_when_recaption_is_set():
    """With models.recaption the given caption is never read, so an unreadable one must not drop the image."""
    import types

    from train.data.build import make_raw_processor
    from train.data.sources import RawItem

    asked = []
    labeller = types.SimpleNamespace(caption=lambda image, given, key: asked.append(key))  # -> None: failed_caption
    item = RawItem(0, "k0", "a.png", read=lambda: _png(_noise_image(np.random.default_rng(1))),
                   caption_error="caption file a.txt cannot be read")
    config = BuildConfig(input="unused", output="unused")
    assert make_raw_processor(config, labeller)(item) == (None, "unreadable_caption") and asked == []
    config.models.recaption = True
    assert make_raw_processor(config, labeller)(item) == (None, "failed_caption") and asked == ["k0"]


@pytest.mark.parametrize("line", ['[1, 2]', '{"image": 5, "caption": "x"}', '{"image": "a.png", "caption": 5}'])
def test_a_jsonl_entry_of_another_type_is_named_before_any_work(tmp_path, line):
    """A captions-file or pairs JSONL line that is not an object, or holds a number where text belongs, raised
    AttributeError / TypeError out of the input iterator in the middle of the run."""
    folder = tmp_path / "images"
    folder.mkdir()
    _noise_image(np.random.default_rng(7)).save(folder / "a.png")
    jsonl = folder / "pairs.jsonl"
    jsonl.write_text('{"image": "a.png", "caption": "fine"}\n\n' + line + "\n")  # named by its line: 3
    with pytest.raises(ValueError, match=r"pairs.jsonl:3: .* is not \{\"image\""):
        run_ingest_pairs(IngestConfig(input=str(jsonl), output=str(tmp_path / "out"), image_size=16))
    from train.data.sources import iter_folder

    with pytest.raises(ValueError, match=r"captions file .*pairs.jsonl:3: .* is not \{\"image\""):
        list(iter_folder(str(folder), str(jsonl)))


def test_a_captions_file_entry_with_a_null_caption_means_none_given(tmp_path):
    """`"caption": null` (as the pairs JSONL allows) fell back to the sidecar .txt until a type check made it stop
    the whole build."""
    from train.data.sources import iter_folder

    folder = tmp_path / "images"
    folder.mkdir()
    _noise_image(np.random.default_rng(7)).save(folder / "a.png")
    (folder / "a.txt").write_text("a sidecar caption")
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text('{"image": "a.png", "caption": null}\n')
    assert [item.caption for item in iter_folder(str(folder), str(jsonl))] == ["a sidecar caption"]


def test_a_rerun_may_extend_a_build_but_not_shrink_it(tmp_path):
    """From a review: a rerun with a smaller --count rewrote one shard smaller and left the earlier build's later
    shards, so the folder held neither build. Extending rewrites the short last shard and goes on."""
    from train.data.shards import Sample, run_sharded

    def process(index):
        return Sample(key=f"k{index}", meta={"index": index}), "written"

    output = str(tmp_path / "out")
    assert run_sharded(range(6), process, output, samples_per_shard=4)["written"] == 6  # shards of 4 and 2
    assert run_sharded(range(10), process, output, samples_per_shard=4)["written"] == 10  # extended: 4, 4, 2
    before = {name: os.path.getmtime(os.path.join(output, name)) for name in os.listdir(output)}
    for count in (6, 8):  # a shard rewritten smaller, or the build ending on a shard boundary
        with pytest.raises(ValueError, match=r"holds shards past the \d this run makes .* built with a larger --count"):
            run_sharded(range(count), process, output, samples_per_shard=4)
    assert {name: os.path.getmtime(os.path.join(output, name)) for name in os.listdir(output)} == before


@pytest.mark.parametrize("line", ['[1, 2]', '{"input_caption": "a", "edit": "b"}',
                                  # from a review: a caption that is not text was a traceback mid-build
                                  '{"input_caption": 5, "edit": ["x"], "source": "a.png", "edited": "b.png"}',
                                  '{"input_caption": null, "edit": "x", "source": "a.png", "edited": "b.png"}'])
def test_a_triplets_jsonl_entry_that_does_not_fit_is_named_by_its_line(tmp_path, line):
    """Not an object (AttributeError escaped as a traceback), or no images: named by the line an editor shows
    (blank lines were not counted)."""
    from train.data.ingest import iter_ip2p

    good = json.dumps({"input_caption": "a", "edit": "b", "source": "s.png", "edited": "e.png"})
    (tmp_path / "triplets.jsonl").write_text(good + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=r"triplets.jsonl:3: expected input_caption, edit"):
        iter_ip2p(str(tmp_path))


def test_folder_names_with_brackets_or_commas_and_symlinked_subfolders(tmp_path):
    """Image and shard folders named like globs or lists are read as the folders they are, and images in
    symlinked subfolders count (they were skipped silently; summaries of "out [v2]" reported 0 shards)."""
    from train.data.shards import resolve_shards

    rng = np.random.default_rng(3)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _noise_image(rng).save(elsewhere / "linked.jpg")
    (elsewhere / "linked.txt").write_text("a linked caption")
    for name in ("real [x]", "real, x"):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(2):
            _noise_image(rng).save(folder / f"p{i}.jpg")
            (folder / f"p{i}.txt").write_text(f"caption {i}")
        (folder / "more").symlink_to(elsewhere, target_is_directory=True)
        (elsewhere / "loop").unlink(missing_ok=True)
        (elsewhere / "loop").symlink_to(folder, target_is_directory=True)  # a cycle must not loop
        out = tmp_path / f"out {name}"
        summary = run_ingest_pairs(IngestConfig(input=str(folder), output=str(out), image_size=24,
                                                samples_per_shard=2))
        assert (summary["written"], summary["shards"]) == (3, 2), summary
        assert len(resolve_shards(str(out))) == 2
        assert sorted(s.meta["caption"] for s in read_samples(str(out))) == ["a linked caption", "caption 0",
                                                                             "caption 1"]


def _raw_pairs_shard(path, keys):
    """An img2dataset-style shard: jpg + txt per sample, no kosmosg json."""
    rng = np.random.default_rng(5)
    with tarfile.open(path, "w") as tar:
        for key in keys:
            for ext, payload in (("jpg", _png(_noise_image(rng))), ("txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_unreadable_shards_are_skipped_and_wrong_kinds_named(tmp_path, caplog):
    shards = tmp_path / "shards"
    shards.mkdir()
    _raw_pairs_shard(shards / "a-000000.tar", ["p0", "p1"])
    (shards / "b-000000.tar").write_bytes(b"not a tar at all" * 64)
    _raw_pairs_shard(shards / "c-000000.tar", ["p2"])
    with caplog.at_level("WARNING"):
        summary = run_ingest_pairs(IngestConfig(input=str(shards), output=str(tmp_path / "out"), image_size=16))
    assert summary["written"] == 3  # the shards before and after the broken one
    assert "b-000000.tar: it cannot be read" in caplog.text
    with pytest.raises(ValueError, match="is not a kosmosg-data sample .*train.data"):
        run_to_official(OfficialConfig(input=str(shards), output=str(tmp_path / "official")))
    with pytest.raises(ValueError, match="holds kosmosg-data shards"):
        run_ingest_pairs(IngestConfig(input=str(tmp_path / "out"), output=str(tmp_path / "out2"), image_size=16))


def test_ip2p_sample_drop_spans_give_the_dropped_text():
    """Drop mode of an editing triplet removes exactly the input caption: applying the stored spans to
    `text` gives `text_dropped` (stage 3 uses the spans)."""
    tiny = _png(Image.new("RGB", (2, 2)))
    meta = ip2p_sample("k", "a house", "make it snowy", [(tiny, tiny)]).meta
    assert remove_spans(meta["text"], meta["drop_spans"]) == meta["text_dropped"] == "<i>make it snowy"


def test_ingest_ip2p_keeps_source_and_edited_apart_and_honours_max_variants(tmp_path):
    """Release layout: `<seed>_0.jpg` is the source (entity_0), `<seed>_1.jpg` the edited target;
    --max-variants N keeps the first N seeds."""
    release = tmp_path / "release"
    (release / "0001").mkdir(parents=True)
    (release / "0001" / "prompt.json").write_text(json.dumps({"input": "a house", "edit": "make it snowy"}))
    for seed in (11, 12, 13):
        Image.new("RGB", (24, 16), (20, 20, 20)).save(release / "0001" / f"{seed}_0.jpg")
        Image.new("RGB", (24, 16), (230, 230, 230)).save(release / "0001" / f"{seed}_1.jpg")
    (release / "seeds.json").write_text(json.dumps([["0001", [11, 12, 13]]]))
    config = IngestConfig(input=str(release), output=str(tmp_path / "out"), image_size=0, max_variants=2)
    assert run_ingest_ip2p(config)["written"] == 1
    sample = next(iter(read_samples(config.output)))
    assert sample.meta["variants"] == 1 and "variant_2_target.png" not in sample.images
    for source, edited in (("entity_0.png", "target.png"), ("variant_1_entity_0.png", "variant_1_target.png")):
        assert np.asarray(Image.open(io.BytesIO(sample.images[source]))).mean() < 60  # the dark source
        assert np.asarray(Image.open(io.BytesIO(sample.images[edited]))).mean() > 200  # the light edit


def test_ingest_pairs_min_side_drops_images_with_a_short_side(tmp_path):
    """--min-side (official LAION filter) looks at the shorter side of each image."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    rng = np.random.default_rng(7)
    _noise_image(rng, 48, 64).save(folder / "wide.png")  # shorter side 48
    _noise_image(rng, 56, 56).save(folder / "square.png")
    for stem in ("wide", "square"):
        (folder / f"{stem}.txt").write_text(f"a {stem} picture")
    summary = run_ingest_pairs(IngestConfig(input=str(folder), output=str(tmp_path / "out"), image_size=0,
                                            min_side=50))
    assert (summary["written"], summary["too_small"]) == (1, 1)
    assert [s.meta["caption"] for s in read_samples(str(tmp_path / "out"))] == ["a square picture"]


def test_ingest_skips_an_image_whose_resized_copy_would_pass_the_pixel_limit(tmp_path, monkeypatch):
    """A banner whose shorter side is scaled up to --image-size became a huge image (10000x20 at 512:
    256000x512, ~390 MB; thinner ones GBs) that training then refuses as a decompression bomb."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 16)  # the limit, scaled down to the test's images
    folder = tmp_path / "pairs"
    folder.mkdir()
    rng = np.random.default_rng(7)
    _noise_image(rng, 4, 40).save(folder / "banner.png")  # 40x4 -> 160x16 at 16 px: 2560 > 640 pixels
    _noise_image(rng, 20, 30).save(folder / "photo.png")  # 30x20 -> 24x16: 384 pixels
    for stem in ("banner", "photo"):
        (folder / f"{stem}.txt").write_text(f"a {stem}")
    summary = run_ingest_pairs(IngestConfig(input=str(folder), output=str(tmp_path / "out"), image_size=16))
    assert (summary["written"], summary["too_large"]) == (1, 1)
    assert [s.meta["caption"] for s in read_samples(str(tmp_path / "out"))] == ["a photo"]
    # InstructPix2Pix: only the pair that would pass the limit is left out
    jsonl = tmp_path / "triplets.jsonl"
    jsonl.write_text(json.dumps({"input_caption": "a", "edit": "b", "pairs": [[str(folder / "banner.png"),
                     str(folder / "photo.png")], [str(folder / "photo.png"), str(folder / "photo.png")]]}) + "\n")
    run_ingest_ip2p(IngestConfig(input=str(jsonl), output=str(tmp_path / "ip2p"), image_size=16))
    (sample,) = read_samples(str(tmp_path / "ip2p"))
    assert sample.meta["variants"] == 0  # one pair: no variant beside it


def test_captions_file_takes_precedence_and_shard_limit_counts_records(tmp_path):
    """A --captions-file entry wins over a sidecar .txt; `limit` on shards yields exactly that many records."""
    from train.data.sources import iter_folder, iter_tar_images

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(8)
    for stem in ("a", "b"):
        _noise_image(rng).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(f"sidecar {stem}")
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"image": "a.png", "caption": "from the file"}) + "\n")
    assert [item.caption for item in iter_folder(str(folder), str(captions))] == ["from the file", "sidecar b"]
    _raw_pairs_shard(tmp_path / "s-000000.tar", ["p0", "p1", "p2", "p3"])
    assert [item.caption for item in iter_tar_images(str(tmp_path / "s-000000.tar"), limit=2)] == ["caption p0",
                                                                                                    "caption p1"]


def test_a_rerun_into_the_same_output_needs_the_same_settings(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    rng = np.random.default_rng(6)
    for i in range(3):
        _noise_image(rng).save(folder / f"p{i}.jpg")
        (folder / f"p{i}.txt").write_text(f"caption {i}")
    out = str(tmp_path / "out")
    first = run_ingest_pairs(IngestConfig(input=str(folder), output=out, image_size=16, count=2, samples_per_shard=1))
    assert first["written"] == 2
    with pytest.raises(ValueError, match=r"other settings \(image_size 16 -> 24\).*a new output folder"):
        run_ingest_pairs(IngestConfig(input=str(folder), output=out, image_size=24, samples_per_shard=1))
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)  # the input may move and a rerun may extend the count
    assert run_ingest_pairs(IngestConfig(input=str(moved), output=out, image_size=16, count=3,
                                         samples_per_shard=1))["written"] == 3
    # a last shard cut short by a smaller count is completed when the count grows
    partial = str(tmp_path / "partial")
    assert run_ingest_pairs(IngestConfig(input=str(folder), output=partial, image_size=16, count=1,
                                         samples_per_shard=2))["written"] == 1
    assert run_ingest_pairs(IngestConfig(input=str(folder), output=partial, image_size=16, count=3,
                                         samples_per_shard=2))["written"] == 3


def test_shards_never_overwrite_a_folder_no_run_made(tmp_path):
    """Found by a review: an --output holding the user's own shard-000000.tar (no settings.json), or the input folder
    itself, had that shard overwritten; refused now, the files untouched. A killed writer's temp file alone is not
    content."""
    from kosmosg_core.files import TEMP_PREFIX

    folder = tmp_path / "pairs"
    folder.mkdir()
    _noise_image(np.random.default_rng(7)).save(folder / "p0.jpg")
    (folder / "p0.txt").write_text("caption 0")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "shard-000000.tar").write_bytes(b"the user's shard")
    for output in (theirs, folder):
        before = {p.name: p.read_bytes() for p in output.iterdir()}
        with pytest.raises(ValueError, match=rf"--output {re.escape(str(output))} is not empty \(.*\) and holds no "
                                             r"settings\.json, so no run of this command made it.*Give a new or empty"):
            run_ingest_pairs(IngestConfig(input=str(folder), output=str(output), image_size=16, samples_per_shard=1))
        assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    (theirs / "video.mp4.partial").write_bytes(b"the user's download")  # a name a killed run of ours once left
    with pytest.raises(ValueError, match="is not empty"):
        run_ingest_pairs(IngestConfig(input=str(folder), output=str(theirs), image_size=16, samples_per_shard=1))
    assert (theirs / "video.mp4.partial").read_bytes() == b"the user's download"  # a refused folder is not touched
    killed = tmp_path / "killed"  # hidden files hold no data: a killed writer's temp file, .DS_Store, .gitkeep
    killed.mkdir()
    for name in (f"{TEMP_PREFIX}1-host-abcd.tmp", ".DS_Store", ".gitkeep"):
        (killed / name).write_bytes(b"x")
    assert run_ingest_pairs(IngestConfig(input=str(folder), output=str(killed), image_size=16,
                                         samples_per_shard=1))["written"] == 1


def test_build_and_ingest_settings_are_checked(tmp_path):
    from train.data.sources import iter_raw_items, load_label_source

    with pytest.raises(ValueError, match="crop.target_size 0: must be at least 1"):
        run_build(BuildConfig(source="nano-world", count=2, output=str(tmp_path / "o"),
                              crop=CropConfig(target_size=0)))
    with pytest.raises(ValueError, match="image_size=-1: must be 0 or more"):
        run_ingest_pairs(IngestConfig(input=str(tmp_path), output=str(tmp_path / "o2"), image_size=-1))
    with pytest.raises(ValueError, match="--source 'nano-wrld' is unknown"):
        list(iter_raw_items(None, "nano-wrld"))
    with pytest.raises(ValueError, match=r"source_options \['bogus'\] do not fit it"):
        load_label_source("nano-world", 0, 2, {"bogus": 3})


# ---- mix ----------------------------------------------------------------------------------------

def _synthetic_sources(root, per_source=400):
    tiny = _png(Image.new("RGB", (2, 2), (1, 2, 3)))
    folders = {}
    for kind in ("laion", "instructpix2pix", "openimage"):
        folder = os.path.join(root, kind)
        os.makedirs(folder)
        if kind == "instructpix2pix":
            samples = [ip2p_sample(f"{i:05d}", "in", "edit", [(tiny, tiny)]) for i in range(per_source)]
        else:
            samples = [laion_sample(f"{i:05d}", f"{kind} {i}", tiny) for i in range(per_source)]
            for s in samples:
                s.meta["kind"] = kind  # only the source label matters for mixing
        write_shard(os.path.join(folder, "shard-000000.tar"), samples[: per_source // 2])
        write_shard(os.path.join(folder, "shard-000001.tar"), samples[per_source // 2:])
        folders[kind] = folder
    return folders


def test_mix_honours_ratio_and_is_deterministic(tmp_path):
    sources = _synthetic_sources(str(tmp_path / "src"))
    config = MixConfig(output=str(tmp_path / "a"), count=500, seed=5, samples_per_shard=128, **sources)
    summary = run_mix(config)
    assert summary["written"] == 500
    picked = [s.meta["mixed_from"]["source"] for s in read_samples(config.output)]
    counts = {kind: picked.count(kind) for kind in sources}
    for kind, share in (("laion", 0.2), ("instructpix2pix", 0.4), ("openimage", 0.4)):
        assert abs(counts[kind] / 500 - share) < 4 * (share * (1 - share) / 500) ** 0.5, counts
    # each source is consumed in its own order
    laion_keys = [s.meta["mixed_from"]["key"] for s in read_samples(config.output)
                  if s.meta["mixed_from"]["source"] == "laion"]
    assert laion_keys == sorted(laion_keys)
    again = MixConfig(output=str(tmp_path / "b"), count=500, seed=5, samples_per_shard=128, **sources)
    run_mix(again)
    assert _tar_bytes(config.output) == _tar_bytes(again.output)
    other = MixConfig(output=str(tmp_path / "c"), count=500, seed=6, samples_per_shard=128, **sources)
    run_mix(other)
    assert _tar_bytes(other.output) != _tar_bytes(config.output)
    # a source runs out -> the mix stops (ratio kept); weight 0 excludes a source
    for bad in (["a", "b", "c"], [1, float("nan"), 1]):  # from a review: 'a' was float()'s bare message
        with pytest.raises(ValueError, match=r"ratio .*: give three non-negative weights"):
            run_mix(MixConfig(output=str(tmp_path / "bad"), ratio=bad, laion=sources["laion"]))
    only = MixConfig(output=str(tmp_path / "d"), ratio=[1, 0, 0], laion=sources["laion"])
    assert run_mix(only)["written"] == 400


def test_mix_repeat_sources_cycles_a_small_source_as_the_official_loader(tmp_path, caplog):
    """Found by a review: the mix ended when its smallest source ran out (the official loader cycles every
    source), leaving the rest of the others out without a word."""
    sources = _synthetic_sources(str(tmp_path / "src"), per_source=6)
    small = dict(sources, instructpix2pix=None)
    with caplog.at_level("INFO", logger="train.data.mix"):
        ended = run_mix(MixConfig(output=str(tmp_path / "a"), ratio=[1, 0, 4], **small))
    stopped = re.search(r"mix: --(laion|openimage) ran out after 6 samples; the mix ends at (\d+)", caplog.text)
    assert stopped and int(stopped.group(2)) == ended["written"] < 12
    with pytest.raises(ValueError, match="--repeat-sources true needs --count N"):
        run_mix(MixConfig(output=str(tmp_path / "b"), ratio=[1, 0, 4], repeat_sources=True, **small))
    repeated = MixConfig(output=str(tmp_path / "c"), ratio=[1, 0, 4], count=40, repeat_sources=True, **small)
    assert run_mix(repeated)["written"] == 40
    origin = [(s.meta["mixed_from"]["source"], s.meta["mixed_from"]["key"]) for s in read_samples(repeated.output)]
    laion = [key for source, key in origin if source == "laion"]
    openimage = [key for source, key in origin if source == "openimage"]
    assert len(openimage) > 12 and openimage[:12] == sorted(openimage[:6]) * 2  # each pass in the source's order
    assert laion[:6] == sorted(laion[:6]) and len({s.key for s in read_samples(repeated.output)}) == 40


def test_a_mix_folder_of_an_earlier_version_reruns(tmp_path):
    """Found by a review: the new --repeat-sources setting, absent from an earlier version's settings.json, made a
    rerun of its folder refused; it is recorded only when set."""
    sources = _synthetic_sources(str(tmp_path / "src"), per_source=6)
    config = MixConfig(output=str(tmp_path / "m"), ratio=[1, 0, 4], laion=sources["laion"],
                       openimage=sources["openimage"])
    first = run_mix(config)
    settings = json.loads((tmp_path / "m" / "settings.json").read_text())
    assert "repeat_sources" not in settings
    assert run_mix(config)["written"] == first["written"]
    recorded = json.loads((tmp_path / "m" / "settings.json").read_text())  # as versions that recorded it unset wrote
    (tmp_path / "m" / "settings.json").write_text(json.dumps({**recorded, "repeat_sources": False}))
    assert run_mix(config)["written"] == first["written"]
    with pytest.raises(ValueError, match="repeat_sources"):
        run_mix(dataclasses.replace(config, repeat_sources=True, count=20))


def test_mix_names_swapped_sources_and_leaves_out_stray_samples(tmp_path):
    sources = _synthetic_sources(str(tmp_path / "src"), per_source=8)
    swapped = MixConfig(output=str(tmp_path / "a"), ratio=[1, 0, 0], laion=sources["openimage"])
    with pytest.raises(ValueError, match=r"--laion .* holds 'openimage' samples .* of its own kind"):
        run_mix(swapped)
    tiny = _png(Image.new("RGB", (2, 2), (1, 2, 3)))
    stray = laion_sample("zzzzz", "a stray", tiny)
    stray.meta["kind"] = "openimage"
    write_shard(os.path.join(sources["laion"], "shard-000002.tar"), [stray])
    summary = run_mix(MixConfig(output=str(tmp_path / "b"), ratio=[1, 0, 0], laion=sources["laion"]))
    assert (summary["written"], summary["skipped_wrong_kind"]) == (8, 1)


def test_mix_refuses_negative_weights():
    """A negative ratio weight is a clear error, not a silently dropped source."""
    from train.data.mix import mix_plan

    with pytest.raises(ValueError, match="non-negative"):
        mix_plan(MixConfig(ratio=[1, -1, 2], laion="l", instructpix2pix="i", openimage="o"))
    with pytest.raises(ValueError, match="non-negative"):
        mix_plan(MixConfig(ratio=[0, 0, 0], laion="l"))


# ---- official layout ----------------------------------------------------------------------------

def test_a_full_disk_while_writing_a_shard_is_one_error(tmp_path, monkeypatch):
    """Found by a review: after the one-line error, tarfile's stream flushed again when collected and Python printed
    "Exception ignored in _Stream.__del__" with a second traceback; and no partial shard is left."""
    import gc

    from train.data import shards

    class FullDisk(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    monkeypatch.setattr(shards, "open", lambda path, mode: FullDisk(), raising=False)
    rng = np.random.default_rng(0)
    big = [laion_sample(f"la{i}", "a beach", _png(_noise_image(rng, 64, 64))) for i in range(4)]
    with pytest.raises(OSError, match="No space left"):
        write_shard(str(tmp_path / "shard-000000.tar"), big)
    gc.collect()
    assert unraisable == [] and os.listdir(tmp_path) == []


def test_official_tsv_round_trip(built, tmp_path):
    output, _ = built
    rng = np.random.default_rng(3)
    extra = str(tmp_path / "extra")
    os.makedirs(extra)
    pair = (_png(_noise_image(rng, 8, 12)), _png(_noise_image(rng, 8, 12)))
    write_shard(os.path.join(extra, "x-000000.tar"), [
        ip2p_sample("ip0", "a room", "add a lamp", [pair, pair[::-1]]),
        laion_sample("la0", "a sunny beach", _png(_noise_image(rng, 10, 14)))])
    original = list(read_samples(output)) + list(read_samples(extra))

    official = str(tmp_path / "official")
    run_to_official(OfficialConfig(input=f"{output},{extra}", output=official))
    listing = json.load(open(os.path.join(official, "openimage", "json", "train.json")))
    assert listing[0]["source_lang"] == "openimage" and listing[0]["source"] == ["shard-000000.tsv"]
    line = open(os.path.join(official, "openimage", "data", "shard-000000.tsv")).readline().rstrip("\n").split("\t")
    first = original[0]
    assert line[0] == first.meta["caption"] and line[1].split(",") == [e["name"] for e in first.meta["entities"]]
    assert base64.b64decode(line[2]) == first.images["target.png"]
    assert len(line) == 3 + 2 * len(first.meta["entities"])
    ip2p_line = open(os.path.join(official, "instructpix2pix", "data", "shard-000000.tsv")).read().split("\t")
    assert ip2p_line[:2] == ["a room", "add a lamp"] and len(ip2p_line) == 6
    # each listed file where its official loader opens it (found by a review: the LAION loader opens
    # <folder>/<listed name>, not <folder>/data/<name> as the other two, so it read no LAION file)
    opened_under = {"openimage": "data", "instructpix2pix": "data", "laion": ""}
    for kind, under in opened_under.items():
        for name in json.load(open(os.path.join(official, kind, "json", "train.json")))[0]["source"]:
            assert os.path.isfile(os.path.join(official, kind, under, name)), (kind, name)

    back = str(tmp_path / "back")
    summary = run_from_official(OfficialConfig(input=official, output=back))
    assert summary["written"] == len(original)
    restored = list(read_samples(back))

    def comparable(sample):
        meta = {k: v for k, v in sample.meta.items() if k != "origin"}
        return json.dumps(meta, sort_keys=True), sorted(sample.images.items())

    assert sorted(map(comparable, restored)) == sorted(map(comparable, original))


def test_official_laion_files_in_subfolders_keep_their_keys_apart(tmp_path):
    """Found by a review: keys were made from a listed file's base name, so p1/s.tsv and p2/s.tsv (the LAION loader
    opens listed paths under its folder) gave one key twice: a shard the training stream cannot read."""
    from train.records import RecordStream

    good = base64.b64encode(_png(Image.new("RGB", (4, 4), (9, 9, 9)))).decode()
    folder = tmp_path / "official" / "laion"
    (folder / "json").mkdir(parents=True)
    (folder / "json" / "train.json").write_text(json.dumps([{"source": ["p1/s.tsv", "data/p2/s.tsv"],
                                                             "source_lang": "laion"}]))
    for sub in ("p1", "data/p2"):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "s.tsv").write_text(f"k\ta beach\t{good}\t4\t4\n")
    summary = run_from_official(OfficialConfig(input=str(tmp_path / "official"), output=str(tmp_path / "out")))
    assert summary["written"] == 2
    stream = RecordStream(str(tmp_path / "out"), seed=0)
    keys = {stream.next().key for _ in range(2)}
    assert keys == {"laion_p1_s_0000001", "laion_p2_s_0000001"}


def test_official_lines_with_odd_fields_or_corrupt_png_are_counted_not_crashed():
    """from-official: an InstructPix2Pix line with an unpaired image is `malformed`; a line whose base64
    image starts like a PNG but does not decode is `skipped_corrupt` (its bytes are not kept)."""
    from train.data.official_tsv import PNG_MAGIC, TsvLine, tsv_line_to_sample

    good = base64.b64encode(_png(Image.new("RGB", (4, 4), (9, 9, 9)))).decode()
    broken = base64.b64encode(PNG_MAGIC + b"not really a png").decode()
    odd = TsvLine(0, "instructpix2pix", "ip2p/x:0000001", ["a room", "add a lamp", good, good, good])
    assert tsv_line_to_sample(odd) == (None, "malformed")
    corrupt = TsvLine(1, "laion", "laion/x:0000001", ["k", "a beach", broken, "4", "4"])
    assert tsv_line_to_sample(corrupt) == (None, "skipped_corrupt")
    sample, outcome = tsv_line_to_sample(TsvLine(2, "laion", "laion/x:0000002", ["k", "a beach", good, "4", "4"]))
    assert outcome == "written" and sample.meta["caption"] == "a beach"
    # a caption with a literal <i> (HTML italics) was kept: a sample every stage skips (one more placeholder)
    sample, _ = tsv_line_to_sample(TsvLine(3, "laion", "laion/x:0000003", ["k", "a <i>Sula</i>\x00 bird", good, "4", "4"]))
    assert sample.meta["text"] == "a Sula</i> bird"


def test_official_tsv_lines_that_are_not_utf8_or_lack_fields_are_counted_and_named(tmp_path, caplog):
    """A TSV line with bytes that are not UTF-8 raised UnicodeDecodeError out of the reader: from-official ended
    with 'utf-8 codec can't decode' naming no file. Now that line is `malformed`, named in a warning, like a
    line with too few fields (counted silently before); CRLF line ends still read."""
    good = base64.b64encode(_png(Image.new("RGB", (4, 4), (9, 9, 9)))).decode()
    folder = tmp_path / "official" / "laion"
    (folder / "json").mkdir(parents=True)
    (folder / "json" / "train.json").write_text(json.dumps([{"source": ["x.tsv"], "source_lang": "laion"}]))
    (folder / "x.tsv").write_bytes(f"k0\ta beach\t{good}\t4\t4\r\n".encode() + b"k1\tcaf\xe9\t" + good.encode() +
                                   b"\t4\t4\n" + b"k2\tonly two fields\n")
    with caplog.at_level("WARNING"):
        summary = run_from_official(OfficialConfig(input=str(tmp_path / "official"), output=str(tmp_path / "out")))
    assert (summary["written"], summary["malformed"]) == (1, 2)
    assert "laion/x:0000002: not UTF-8 text" in caplog.text
    assert "laion/x:0000003: 2 tab-separated fields, expected key, caption, image" in caplog.text


def test_iter_records_inside_a_gloo_process_group(tmp_path, monkeypatch):
    """Under torchrun / accelerate launch (RANK, WORLD_SIZE set; gloo group initialised) reading
    shards must not hit webdataset's "you need to add an explicit nodesplitter" refusal; every
    process sees every shard unless node splitting is asked for."""
    import torch.distributed as dist

    from train.data.shards import Sample, iter_records

    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(3):
        write_shard(str(folder / f"s-{shard:06d}.tar"),
                    [Sample(key=f"s{shard}_{i}", meta={"shard": shard, "i": i}) for i in range(2)])
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        monkeypatch.setenv("RANK", "1")  # what the launcher exports for the second of two processes
        monkeypatch.setenv("WORLD_SIZE", "2")
        keys = [record["__key__"] for record in iter_records(str(folder))]
        assert keys == [f"s{shard}_{i}" for shard in range(3) for i in range(2)]
        split = [record["__key__"] for record in iter_records(str(folder), split_by_node=True)]
        assert split == ["s1_0", "s1_1"]  # rank 1 of 2 takes shards 1, 3, 5, ...
        assert [s.meta["shard"] for s in read_samples(str(folder))] == [0, 0, 1, 1, 2, 2]
    finally:
        dist.destroy_process_group()


def test_several_processes_share_the_shards_and_the_last_to_end_writes_the_summary(tmp_path, monkeypatch):
    """Process RANK of WORLD_SIZE writes shards index % WORLD_SIZE == RANK; summary.json is written only
    once every shard of the run is there (a process ending earlier would count only part of the run)."""
    from train.data.shards import Sample, run_sharded

    def process(index):
        return Sample(key=f"k{index}", meta={"index": index}), "written"

    output = str(tmp_path / "out")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # ends first
    first = run_sharded(range(5), process, output, samples_per_shard=1)
    assert sorted(os.listdir(output)) == [f"shard-{i:06d}.{ext}" for i in (1, 3) for ext in ("stats.json", "tar")]
    assert first["this_run"]["shards_written"] == 2
    monkeypatch.setenv("RANK", "0")
    last = run_sharded(range(5), process, output, samples_per_shard=1)
    assert last["this_run"]["shards_written"] == 3
    saved = json.load(open(os.path.join(output, "summary.json")))
    assert (saved["shards"], saved["written"], saved["processed"]) == (5, 5, 5) and "this_run" not in saved
    assert sorted(s.meta["index"] for s in read_samples(output)) == list(range(5))


def test_a_process_ending_first_never_writes_its_totals_over_the_complete_summary(tmp_path, monkeypatch):
    """Process 0 ends while process 1 still writes its last shard: whatever the interleaving, the summary.json
    left at the end counts every shard (here process 1 finishes inside process 0's summing)."""
    from train.data import shards
    from train.data.shards import Sample, run_sharded

    def process(index):
        return Sample(key=f"k{index}", meta={"index": index}), "written"

    output = str(tmp_path / "out")
    monkeypatch.setenv("WORLD_SIZE", "2")
    real_summarize, others = shards.summarize, []

    def summarize_while_process_1_ends(folder, prefix="shard"):
        totals = real_summarize(folder, prefix)
        if not others:  # process 0 is summing: process 1 writes its shards and ends now
            others.append(1)
            monkeypatch.setenv("RANK", "1")
            run_sharded(range(4), process, output, samples_per_shard=1)
            monkeypatch.setenv("RANK", "0")
        return totals

    monkeypatch.setattr(shards, "summarize", summarize_while_process_1_ends)
    monkeypatch.setenv("RANK", "0")
    run_sharded(range(4), process, output, samples_per_shard=1)
    if not others:  # process 0 did not sum (it saw process 1's shards missing): process 1 ends after it
        monkeypatch.setenv("RANK", "1")
        run_sharded(range(4), process, output, samples_per_shard=1)
    saved = json.load(open(os.path.join(output, "summary.json")))
    assert (saved["shards"], saved["written"]) == (4, 4)


def test_old_partial_files_are_removed(tmp_path):
    """Versions before the core's atomic writer left `NAME.partial` files when killed: a rerun removes them."""
    from train.data.shards import Sample, run_sharded

    output = tmp_path / "out"
    output.mkdir()
    for name in ("shard-000000.tar.partial", "shard-000000.stats.json.partial", "summary.json.partial"):
        (output / name).write_bytes(b"half")
    run_sharded(range(1), lambda i: (Sample(key="k", meta={}), "written"), str(output), samples_per_shard=1)
    assert not list(output.glob("*.partial"))


def test_to_official_is_written_by_the_first_process_only(tmp_path, monkeypatch):
    """A conversion with no model: process 0 writes the whole layout; the others write nothing (every
    process writing the same files would race on them)."""
    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(str(folder / "s-000000.tar"), [laion_sample("a", "a red ball", _png(_noise_image(np.random.default_rng(0), 8, 8)))])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run_to_official(OfficialConfig(input=str(folder), output=str(tmp_path / "rank1"))) == {}
    assert not (tmp_path / "rank1").exists()
    monkeypatch.setenv("RANK", "0")
    summary = run_to_official(OfficialConfig(input=str(folder), output=str(tmp_path / "rank0")))
    assert summary["written"] == 1 and (tmp_path / "rank0" / "laion" / "json" / "train.json").exists()


@pytest.mark.parametrize("content,problem", [('[["a", [1]]', "is not valid JSON"),  # cut short
                                             ('{"a": [1]}', "holds a JSON dict"),
                                             ('[["a", 1]]', "an entry is not"),
                                             ('[[1, [1]]]', "an entry is not"),  # a number as the folder name
                                             ('[["a"]]', "an entry is not")])
def test_a_malformed_seeds_json_names_the_file_and_its_layout(tmp_path, content, problem):
    from train.data.ingest import iter_ip2p

    (tmp_path / "seeds.json").write_text(content)
    with pytest.raises(ValueError, match=f"seeds.json.*{problem}.*folder name, \\[seed"):
        iter_ip2p(str(tmp_path))


def test_a_damaged_shard_stats_file_names_the_file_and_the_fix(tmp_path):
    from train.data.shards import Sample, run_sharded

    def process(index):
        return Sample(key=f"k{index}", meta={}), "written"

    output = str(tmp_path / "out")
    run_sharded(range(2), process, output, samples_per_shard=1)
    (tmp_path / "out" / "shard-000001.stats.json").write_text('{"processed": 1')  # cut short
    with pytest.raises(ValueError, match=r"shard-000001.stats.json is not valid JSON .*Delete it and its .tar"):
        run_sharded(range(2), process, output, samples_per_shard=1)


# ---- command line -------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [None, "build", "ingest-ip2p", "ingest-pairs", "mix", "to-official",
                                     "from-official"])
def test_help(command):
    args = [sys.executable, "-m", "train.data"] + ([command] if command else []) + ["--help"]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage: python -m train.data" in result.stdout
    if command:
        assert "--config" in result.stdout and "--set" in result.stdout


def test_config_file_set_and_flags_precedence(tmp_path, capsys):
    config_file = tmp_path / "data.yaml"
    config_file.write_text("build:\n  seed: 1\n  samples_per_shard: 9\n  crop:\n    entity_size: 128\n")
    parser = cli.build_parser()
    args = parser.parse_args(["build", "--config", str(config_file), "--set", "seed=2", "--set",
                              "models.dtype=float16", "--seed", "3", "--output", "007"])
    config = cli.resolve_config(args)
    assert (config.seed, config.samples_per_shard, config.crop.entity_size) == (3, 9, 128)
    assert config.models.dtype == "float16" and config.output == "007"
    assert cli.main(["build", "--set", "crop.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert cli.main(["ingest-pairs", "--input", str(tmp_path)]) == 2  # no --output: clear error, exit 2
    for word, value in (("yes", True), ("Off", False), ("1", True)):  # the words every train/ flag takes
        config = cli.resolve_config(parser.parse_args(["build", "--set", f"crop.square_crop={word}"]))
        assert config.crop.square_crop is value
    assert cli.main(["build", "--set", "crop.square_crop=maybe"]) == 2
    assert "square_crop='maybe': expected true or false" in capsys.readouterr().err


def test_cli_runs_a_command(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    _noise_image(np.random.default_rng(4)).save(folder / "a.png")
    (folder / "a.txt").write_text("a tiny picture")
    assert cli.main(["ingest-pairs", "--input", str(folder), "--output", str(tmp_path / "out"),
                     "--image-size", "16", "--log-level", "WARNING"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 1


def test_a_missing_training_package_is_one_line_naming_requirements_train(tmp_path):
    """The ComfyUI nodes install only requirements.txt: a train/ command run there says what to install."""
    from support.missing_package import env_without_package

    env = env_without_package(tmp_path, "webdataset")
    (tmp_path / "laion").mkdir()
    result = subprocess.run([sys.executable, "-m", "train.data", "mix", "--laion", str(tmp_path / "laion"),
                             "--output", str(tmp_path / "mixed")], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "No module named 'webdataset'" in result.stderr and "pip install -r requirements-train.txt" in result.stderr


def test_exit_on_input_error_turns_a_missing_package_into_its_fix(capsys):
    from train.common.config import exit_on_input_error

    def main():
        raise ModuleNotFoundError("No module named 'accelerate'", name="accelerate")

    with pytest.raises(SystemExit) as stop:
        exit_on_input_error(main)
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("error: No module named 'accelerate': train/ needs the packages of "
                                              "requirements-train.txt")


def test_official_tsv_lines_of_a_long_named_file_keep_their_own_keys(tmp_path):
    """Found by a review: a sample key was cut to its first 80 characters, so with a long TSV name (the LAION release's
    run to 85) every line got the same key, and the shards written could not be read back (webdataset: duplicate
    file name in tar file). A long key now keeps its start and its end (the line number)."""
    from train.data.shards import sanitize_key

    good = base64.b64encode(_png(Image.new("RGB", (4, 4), (9, 9, 9)))).decode()
    folder = tmp_path / "official" / "laion"
    (folder / "json").mkdir(parents=True)
    name = "laion2B-en-aesthetic-part-00000-5114fd87-297e-42b0-9d11-50f1df323dfa-c000.snappy.tsv"
    (folder / "json" / "train.json").write_text(json.dumps([{"source": [name], "source_lang": "laion"}]))
    (folder / name).write_text("".join(f"k{i}\ta beach {i}\t{good}\t4\t4\n" for i in range(3)))
    summary = run_from_official(OfficialConfig(input=str(tmp_path / "official"), output=str(tmp_path / "out")))
    keys = [sample.key for sample in read_samples(str(tmp_path / "out"))]
    assert summary["written"] == 3 and len(set(keys)) == 3, keys
    assert all(len(key) <= 80 for key in keys)
    assert sanitize_key("a.b/c") == "a_b_c" and sanitize_key("x" * 80) == "x" * 80  # short keys as before
    # long texts differing only in the middle (found by a review: subfolders of a long listed path) stay apart
    long_path = "laion2b-en-aesthetic/downloads-2023-12/batch_{}/laion2b-en-aesthetic-part-00001_0000001"
    cut = [sanitize_key(long_path.format(batch)) for batch in ("0001", "0002")]
    assert cut[0] != cut[1] and all(len(key) <= 80 for key in cut)


def test_counts_and_shard_sizes_out_of_range_are_refused_by_flag(tmp_path, capsys):
    """Found by a review: a negative --count dropped items by slicing (build: the last image; mix: everything, exit
    0), and to-official's --samples-per-shard 0 wrote one file per sample; the data commands checked no ranges."""
    from train.data.cli import main

    for argv, message in ((["mix", "--laion", str(tmp_path), "--ratio", "1,0,0", "--count", "-3", "--output",
                            str(tmp_path / "o")], "--count -3: must be at least 0"),
                          (["build", "--input", str(tmp_path), "--count", "-1", "--output", str(tmp_path / "b")],
                           "--count -1: must be at least 0"),
                          (["to-official", "--input", str(tmp_path), "--output", str(tmp_path / "t"),
                            "--samples-per-shard", "0"], "--samples-per-shard 0: must be at least 1")):
        assert main(argv) != 0, argv
        assert message in capsys.readouterr().err, argv
    assert not any(tmp_path.iterdir())  # nothing written


def test_text_files_that_are_not_utf8_are_named_and_prompts_skipped(tmp_path, caplog):
    """Found by a review: a captions / triplets JSONL that is not UTF-8 stopped with Python's bare "'utf-8' codec
    can't decode" naming no file, and one Latin-1 (or list-holding) prompt.json stopped a whole seeds.json ingest
    that skips unreadable prompts."""
    from train.data.ingest import _read_jsonl, iter_ip2p
    from train.data.sources import _read_captions_file

    latin = tmp_path / "captions.jsonl"
    latin.write_bytes(b'{"image": "a.png", "caption": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"captions file .*captions.jsonl is not UTF-8 text .*save the file as UTF-8"):
        _read_captions_file(str(latin))
    with pytest.raises(ValueError, match=r"captions.jsonl is not UTF-8 text"):
        _read_jsonl(str(latin))
    (tmp_path / "seeds.json").write_text(json.dumps([["a", [1]], ["b", [2]], ["c", [3]]]))
    for name, content in (("a", b'{"input": "a room", "edit": "add a lamp"}'), ("b", b'{"input": "caf\xe9"}'),
                          ("c", b'["a list"]')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "prompt.json").write_bytes(content)
    with caplog.at_level("WARNING"):
        items = iter_ip2p(str(tmp_path))
    assert [(item.input_caption, item.edit) for item in items] == [("a room", "add a lamp"), ("", ""), ("", "")]
    assert caplog.text.count("unreadable prompt") == 2


def test_to_official_refuses_an_output_folder_that_is_not_empty(built, tmp_path):
    """Found by a review: a second to-official run into the same folder kept the first run's other kinds, which
    from-official then read back as part of the second (5 samples for 3)."""
    shards, _ = built
    official = tmp_path / "official"
    official.mkdir()  # empty: fine
    run_to_official(OfficialConfig(input=shards, output=str(official)))
    with pytest.raises(ValueError, match=r"--output .*official is not empty .*give a new or empty folder"):
        run_to_official(OfficialConfig(input=shards, output=str(official)))


@pytest.mark.parametrize("listing", [[{"source": "x.tsv", "source_lang": "laion"}], ["x.tsv"], [{"source": [3]}]])
def test_from_official_refuses_a_listing_it_cannot_read(tmp_path, listing):
    """Found by a review: a "source" written as one name was read letter by letter (one "missing" warning each,
    nothing written, exit 0); an entry that is no mapping was a bare AttributeError."""
    folder = tmp_path / "official" / "laion"
    (folder / "json").mkdir(parents=True)
    (folder / "json" / "train.json").write_text(json.dumps(listing))
    with pytest.raises(ValueError, match=r'train.json: an entry is not \{"source": \[TSV file names\]'):
        run_from_official(OfficialConfig(input=str(tmp_path / "official"), output=str(tmp_path / "out")))


def test_a_folder_of_neither_images_nor_shards_says_so(tmp_path):
    """Found by a review: a folder with no images (only .txt / .tif files) was taken for shards and refused as
    "no .tar files found"."""
    from train.data.sources import iter_raw_items

    (tmp_path / "a.txt").write_text("a caption")
    with pytest.raises(ValueError, match=r"holds neither images \(.*\) nor \.tar shards; give the folder of images"):
        list(iter_raw_items(str(tmp_path)))


def test_set_takes_a_key_of_a_free_form_mapping(tmp_path):
    """Found by a review: `--set source_options.crops=mask` was refused ("unknown config key ...; known keys here: "
    with an empty list): only the mapping form worked."""
    from train.data.cli import build_parser, resolve_config

    config = resolve_config(build_parser().parse_args(
        ["build", "--source", "nano-world", "--set", "source_options.crops=mask", "--set", "source_options.size=40"]))
    assert config.source_options == {"crops": "mask", "size": 40}
    config = resolve_config(build_parser().parse_args(["build", "--set", "source_options={crops: full}"]))
    assert config.source_options == {"crops": "full"}


def test_a_refused_ingest_leaves_no_empty_output_folder_it_made(tmp_path, capsys):
    """Found by a review: an ingest refused on its input (here a pairs JSONL line of the wrong kind, found when
    read) left the --output folder it had just made, empty; a folder that was there before stays."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"image": "a.png", "caption": 3}\n')
    output = tmp_path / "out"
    assert cli.main(["ingest-pairs", "--input", str(pairs), "--output", str(output)]) != 0
    assert "pairs.jsonl:1:" in capsys.readouterr().err
    assert not output.exists()
    output.mkdir()
    assert cli.main(["ingest-pairs", "--input", str(pairs), "--output", str(output)]) != 0
    assert output.is_dir()
