"""Nano Kosmos-G (issue 9): world -> interleaved shards, the nano tokenizer + config, and a few-step
smoke run of stage 1, 2 and 3 on the real nano config (CPU, one thread, no downloads).
"""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kosmosg_core.config import IMAGE_PLACEHOLDER, SD15_CONTEXT_DIM, SD15_CONTEXT_TOKENS, KosmosGConfig
from kosmosg_core.tokenizer import KosmosGTokenizer
from support.train_fixtures import write_clip_text, write_nano_score_model
from train.data.cli import main as data_main
from train.data.nano_labels import NanoWorldLabelSource
from train.data.shards import iter_records
from train.common.metrics import read_metrics
from train.nano import nano_tokenizer, world

REPO = Path(__file__).resolve().parents[1]
NANO_CONFIG = REPO / "train" / "configs" / "nano" / "kosmosg-nano.json"
SIZE_FLAGS = ["--target-size", "64", "--entity-size", "64"]


def build(out, *extra):
    assert data_main(["build", "--output", str(out), "--samples-per-shard", "4", "--log-level", "WARNING",
                      *SIZE_FLAGS, *extra]) == 0
    return out


def read_samples(folder) -> list[dict]:
    records = list(iter_records(sorted(str(p) for p in Path(folder).glob("*.tar"))))
    return [dict(record, meta=json.loads(record["json"])) for record in records]


def png(record, name) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(bytes(record[name]))).convert("RGB"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("nano_kosmosg")
    train = build(root / "train", "--source", "nano-world", "--seed", "7", "--count", "24")
    heldout = build(root / "heldout", "--source", "train.data.nano_labels:heldout", "--seed", "7", "--count", "24")
    return root, train, heldout


# ----------------------------------------------------------------------------------- data


def test_build_writes_interleaved_world_samples(shards):
    _, train, _ = shards
    samples = read_samples(train)
    assert len(samples) == 24 and len(list(Path(train).glob("*.tar"))) == 6
    for record in samples:
        meta = record["meta"]
        split, seed, index = meta["origin"].split(":")[1:]
        assert (split, seed) == ("train", "7")
        scene = world.render_scene(world.spec_at(7, int(index), None, "train"))
        # labels are the world's: caption, one entity per subject named "<colour> <shape>"
        assert meta["kind"] == "openimage" and meta["caption"] == scene.caption
        names = [f"{s.colour} {s.shape}" for s in scene.labels]
        assert [e["name"] for e in meta["entities"]] == names
        # `<i>` follows each entity phrase; removing the markers gives the caption back
        for name in names:
            assert f"{name} {IMAGE_PLACEHOLDER}" in meta["text"]
        assert meta["text"].count(IMAGE_PLACEHOLDER) == len(names)
        assert " ".join(meta["text"].replace(IMAGE_PLACEHOLDER, "").split()) == scene.caption
        assert meta["text_dropped"].count(IMAGE_PLACEHOLDER) == len(names)
        assert not any(name in meta["text_dropped"] for name in names)
        # images: the scene as target, the world's crops and masked crops per entity
        assert np.array_equal(png(record, "target.png"), scene.image)
        for k in range(len(names)):
            assert np.array_equal(png(record, f"entity_{k}.png"), scene.crops[k])
            assert np.array_equal(png(record, f"entity_{k}_masked.png"), scene.masked_crops[k])
    assert {len(r["meta"]["entities"]) for r in samples} == {1, 2}


def test_build_is_deterministic(shards, tmp_path):
    _, train, _ = shards
    again = build(tmp_path / "again", "--source", "nano-world", "--seed", "7", "--count", "24")
    def contents(records):
        return [{k: v if isinstance(v, str) else bytes(v) for k, v in r.items()
                 if k == "__key__" or not (k.startswith("__") or k == "meta")}
                for r in records]

    assert contents(read_samples(again)) == contents(read_samples(train))


def test_heldout_stream_is_disjoint_from_training(shards):
    _, train, heldout = shards
    train_samples, heldout_samples = read_samples(train), read_samples(heldout)
    assert len(heldout_samples) == 24
    for record in heldout_samples:
        split, seed, index = record["meta"]["origin"].split(":")[1:]
        spec = world.spec_at(int(seed), int(index), None, split)
        assert split == "heldout" and world.split_of(spec) == "heldout"
        assert np.array_equal(png(record, "target.png"), world.render_scene(spec).image)
    train_targets = {bytes(r["target.png"]) for r in train_samples}
    assert not train_targets & {bytes(r["target.png"]) for r in heldout_samples}
    assert all(world.split_of(world.spec_at(7, i, None, "train")) == "train" for i in range(24))


def test_label_source_split_and_options():
    assert NanoWorldLabelSource(world, seed=world.HELDOUT_SEED, count=3).split == "heldout"
    assert NanoWorldLabelSource(world, seed=world.TRAIN_SEED, count=3).split == "train"
    assert NanoWorldLabelSource(world, seed=5, count=3).split == "train"  # unknown seeds never leak held-out
    masked = NanoWorldLabelSource(world, seed=5, count=3, crops="mask", num_subjects=2).scene(0)
    assert len(masked.entities) == 2 and all(e.mask is not None and e.crop is None for e in masked.entities)
    for bad in ({"split": "test"}, {"crops": "boxes"}, {"num_subjects": 3}, {"count": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            NanoWorldLabelSource(world, **{"seed": 0, "count": 2, **bad})


# ----------------------------------------------------------------------------------- tokenizer + config


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return nano_tokenizer.write_tokenizer(tmp_path_factory.mktemp("nano_tok") / "tokenizer")


def test_tokenizer_and_config_agree(tokenizer_dir):
    tokenizer = KosmosGTokenizer.from_dir(tokenizer_dir)
    cfg = KosmosGConfig.from_json(NANO_CONFIG.read_text())
    assert tokenizer.vocab_size == cfg.decoder.vocab_size == nano_tokenizer.NANO_VOCAB_SIZE
    assert (cfg.aligner.width, cfg.aligner.num_queries) == (SD15_CONTEXT_DIM, SD15_CONTEXT_TOKENS)
    assert cfg.connector.num_queries == cfg.image_token_slots < cfg.vision.num_patches
    # every world word is one piece: the MLLM sees the grammar, not characters
    import sentencepiece

    pieces = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_dir / "sentencepiece.bpe.model"))
    words = {w.strip(",") for caption in nano_tokenizer.world_captions() for w in caption.split()}
    assert all(len(pieces.encode(w)) == 1 for w in words)
    assert nano_tokenizer.tokenizer_bytes() == nano_tokenizer.tokenizer_bytes()


def test_tokenizer_corpus_is_exactly_the_world_grammar():
    """world_captions(): every caption of the grammar once, subjects left to right. Count: 4 backgrounds x
    (3 positions x 24 subjects + 3 ordered position pairs x 24 x 23 distinct subject pairs) = 6912."""
    captions = nano_tokenizer.world_captions()
    assert len(captions) == len(set(captions)) == 4 * (3 * 24 + 3 * 24 * 23)
    order = {p: i for i, p in enumerate(world.POSITIONS)}
    for caption in captions:
        subjects, background = world.parse_caption(caption)
        assert background in world.BACKGROUNDS
        assert [order[p] for *_, p in subjects] == sorted(order[p] for *_, p in subjects)
        assert len({p for *_, p in subjects}) == len(subjects)


# ----------------------------------------------------------------------------------- stage smoke runs


def recipe(name) -> Path:
    return REPO / "train" / "configs" / "nano" / f"kosmosg-{name}.yaml"


def test_stage_recipes_parse_and_use_the_nano_config():
    from train.common.config import parse_config
    from train.stage1 import Stage1Config
    from train.stage2 import Stage2Config
    from train.stage3 import Stage3Config

    for name, klass in (("stage1", Stage1Config), ("stage2", Stage2Config), ("stage3", Stage3Config)):
        cfg = parse_config(klass, ["--config", str(recipe(name))])
        assert (REPO / cfg.model_config).resolve() == NANO_CONFIG.resolve()
        assert cfg.mixed_precision == "no" and cfg.max_steps > 0
    stage3 = parse_config(Stage3Config, ["--config", str(recipe("stage3"))])
    assert (stage3.score_model_kind, stage3.resolution, stage3.uncond_prob) == ("nano", 64, 0.1)
    assert parse_config(Stage2Config, ["--config", str(recipe("stage2"))]).kinds == "laion,openimage"
    stage1 = parse_config(Stage1Config, ["--config", str(recipe("stage1"))])
    assert stage1.init_vision.endswith("text-encoder/vision-tower")  # the nano CLIP tower seeds the vision encoder


def write_nano_vision_tower(folder: Path) -> str:
    """A random CLIPVisionModel shaped like the nano text encoder's tower, saved as train_text_encoder saves it."""
    from transformers import CLIPVisionModel

    from train.nano import text_encoder as te

    vision = KosmosGConfig.from_json(NANO_CONFIG.read_text()).vision
    torch.manual_seed(0)
    CLIPVisionModel(te.vision_config(vision.width, vision.layers, vision.heads, vision.image_size,
                                     vision.patch_size)).save_pretrained(str(folder))
    te.save_vision_preprocessor(folder, vision.image_size)
    return str(folder)


@pytest.fixture(scope="module")
def stage_env(shards, tokenizer_dir):
    root, train, _ = shards
    torch.set_num_threads(1)
    return dict(root=root, data=str(train), tokenizer=str(tokenizer_dir),
                clip=write_clip_text(root / "clip", hidden=SD15_CONTEXT_DIM),
                score=write_nano_score_model(root / "nano.safetensors", context_dim=SD15_CONTEXT_DIM),
                vision_tower=write_nano_vision_tower(root / "vision-tower"))


def stage_args(env, name, steps=3):
    """The shipped nano stage recipe (train/configs/nano/kosmosg-stageN.yaml), shrunk to a few steps."""
    return ["--config", str(recipe(name)), "--data", env["data"], "--tokenizer", env["tokenizer"],
            "--model-config", str(NANO_CONFIG),
            "--output-dir", str(env["root"] / name), "--batch-size", "2", "--max-steps", str(steps),
            "--save-every", str(steps), "--warmup-steps", "1", "--tensorboard", "false", "--progress", "false"]


def assert_ran(run_dir, steps=3):
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert (run_dir / "checkpoint.pt").is_file()


@pytest.fixture(scope="module")
def stage1_run(stage_env):
    from train import stage1

    stage1.main(stage_args(stage_env, "stage1") + ["--init-vision", stage_env["vision_tower"]])
    return stage_env["root"] / "stage1"


@pytest.fixture(scope="module")
def stage2_run(stage_env, stage1_run):
    from train import stage2

    stage2.main(stage_args(stage_env, "stage2") + ["--clip-text-encoder", stage_env["clip"],
                                                  "--init-checkpoint", str(stage1_run)])
    return stage_env["root"] / "stage2"


def test_stage1_smoke(stage1_run):
    assert_ran(stage1_run)


def test_stage2_smoke(stage2_run):
    assert_ran(stage2_run)


def test_stage3_smoke(stage_env, stage2_run):
    from train import stage3

    stage3.main(stage_args(stage_env, "stage3") + ["--score-model", stage_env["score"],
                                                  "--init-checkpoint", str(stage2_run)])
    assert_ran(stage_env["root"] / "stage3")
