"""train/ stages end to end on tiny models and a tiny generated dataset (CPU, no downloads).

Stage chain stage1 -> stage2 -> stage3 -> export, each from the previous run's checkpoint; losses go
down, only the parts each stage trains change, and the exported file loads in kosmosg_core.
"""

import json
import re
import subprocess
import shutil
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from support.argv import with_flags
from support.train_fixtures import CONTEXT_DIM, make_env, subprocess_env
from kosmosg_core.config import BOS_ID
from train.common.checkpointing import load_checkpoint
from train.common.metrics import read_metrics
from train.loop import polynomial_decay
from train.records import RecordStream

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("train"))


def common(env, out, steps=30, batch=4):
    return ["--data", env.data, "--tokenizer", env.tokenizer, "--model-config", env.model_config,
            "--output-dir", str(out), "--batch-size", str(batch), "--max-steps", str(steps), "--save-every", "10",
            "--warmup-steps", "3", "--tensorboard", "false", "--progress", "false"]


def mean(values):
    return sum(values) / len(values)


def changed(before: dict, after: dict, prefix: str) -> bool:
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, prefix
    return any(not torch.equal(before[k], after[k]) for k in keys)


@pytest.fixture(scope="module")
def stage1_run(env):
    from train import stage1

    out = env.root / "stage1"
    stage1.main(common(env, out))
    return out


@pytest.fixture(scope="module")
def stage2_run(env, stage1_run):
    from train import stage2

    out = env.root / "stage2"
    stage2.main(common(env, out) + ["--clip-text-encoder", env.clip, "--init-checkpoint", str(stage1_run)])
    return out


@pytest.fixture(scope="module")
def stage3_run(env, stage2_run):
    from train import stage3

    out = env.root / "stage3"
    stage3.main(common(env, out) + ["--score-model", env.sd, "--resolution", "16", "--init-checkpoint", str(stage2_run),
                                    "--learning-rate", "2e-3"])
    return out


def test_entry_point_help_runs_as_module():
    result = subprocess.run([sys.executable, "-m", "train.stage3", "--help"], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m train.stage3 ")  # not stage3.py
    assert "--init-checkpoint runs/stage2 \\\n" in result.stdout  # the example's line break survives
    for flag in ("--config", "--score-model", "--uncond-prob", "--resume", "--mixed-precision", "--learning-rate"):
        assert flag in result.stdout


@pytest.mark.parametrize("module", ["train.stage1", "train.stage2", "train.export"])
def test_help_lists_flags(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(["--help"])
    assert exit_info.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_polynomial_decay_matches_fairseq_schedule():
    lrs = [polynomial_decay(s, warmup=4, total=12, peak=1e-3, end=0.0, power=1.0) for s in range(12)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warm-up over 4 updates
    assert lrs[4:] == pytest.approx([1e-3 * (1 - k / 8) for k in range(1, 9)])  # then linear to 0 at update 12
    curved = [polynomial_decay(s, warmup=4, total=12, peak=1e-3, end=1e-4, power=2.0) for s in range(4, 12)]
    assert curved == pytest.approx([(1e-3 - 1e-4) * (1 - k / 8) ** 2 + 1e-4 for k in range(1, 9)])
    assert curved[-1] == 1e-4  # the end LR at the last update


def test_optimizer_and_frozen_dtypes_follow_the_config():
    from train.loop import LoopConfig, build_optimizer
    from train.model_init import frozen_dtype

    cfg = LoopConfig()
    assert (cfg.weight_decay, cfg.clip_norm) == (0.01, 2.0)  # official
    layer = torch.nn.Linear(3, 3)
    _, optimizer, _ = build_optimizer(layer.parameters(), cfg)
    assert optimizer.param_groups[0]["weight_decay"] == 0.01
    before = layer.weight.detach().clone()
    layer.weight.grad, layer.bias.grad = torch.zeros(3, 3), torch.zeros(3)
    optimizer.step()  # decoupled decay: a zero gradient still shrinks the weights by lr * wd
    assert torch.allclose(layer.weight, before * (1 - optimizer.param_groups[0]["lr"] * 0.01))
    expected = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}
    assert {name: frozen_dtype(LoopConfig(mixed_precision=name)) for name in expected} == expected


def test_config_file_and_flag_precedence(env, tmp_path):
    from train.common.config import parse_config
    from train.stage3 import Stage3Config

    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 5.0e-4\nuncond_prob: 0.2\nbatch_size: 3\n")
    cfg = parse_config(Stage3Config, ["--config", str(config), "--batch-size", "7"])
    assert (cfg.learning_rate, cfg.uncond_prob, cfg.batch_size) == (5e-4, 0.2, 7)
    assert (cfg.adam_beta2, cfg.adam_eps, cfg.clip_norm, cfg.warmup_steps) == (0.98, 1e-6, 2.0, 375)


@pytest.mark.parametrize("flag", ["--batch-size", "--max-steps", "--save-every", "--log-every",
                                  "--gradient-accumulation-steps"])
def test_counts_below_their_minimum_are_refused_by_flag(flag, tmp_path, capsys):
    import dataclasses

    from train.common.config import build_parser, parse_config
    from train.loop import run_training
    from train.stage1 import Stage1, Stage1Config

    config = tmp_path / "c.yaml"
    config.write_text(f"{flag[2:].replace('-', '_')}: 0\n")
    for argv in ([flag, "0"], ["--config", str(config)]):
        with pytest.raises(ValueError, match=f"^{flag} 0: must be at least 1.$"):
            parse_config(Stage1Config, argv)
    from support.train_fixtures import tiny_tokenizer

    tokenizer = str(tiny_tokenizer(tmp_path))
    bad = dataclasses.replace(parse_config(Stage1Config, ["--tokenizer", tokenizer]),
                              **{flag[2:].replace("-", "_"): 0})
    with pytest.raises(ValueError, match=f"{flag} 0: must be at least 1"):  # a config made in Python, too
        run_training(Stage1(bad), bad)
    build_parser(Stage1Config, "").print_help()
    assert "(at least 1)" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_missing_tokenizer_is_refused_by_flag(stage, tmp_path):
    """Every stage tokenizes prompts: no --tokenizer is a clear error, not an AttributeError deep in the build."""
    import importlib

    stage_settings = ["--score-model", str(tmp_path / "sd")] if stage == "stage3" else []  # stage 3 asks for it first
    with pytest.raises(ValueError, match="^--tokenizer is required"):
        importlib.import_module(f"train.{stage}").main(["--output-dir", str(tmp_path / "run"), "--model-config", "tiny",
                                                        *stage_settings])


def test_missing_data_is_refused_before_any_model_is_loaded(tmp_path):
    """--data is checked first: a missing --init-checkpoint (read by the model build) is not what is reported."""
    from support.train_fixtures import tiny_tokenizer
    from train.stage1 import main

    with pytest.raises(ValueError, match="^No training data: pass --data"):
        main(["--output-dir", str(tmp_path / "run"), "--tokenizer", str(tiny_tokenizer(tmp_path)),
              "--init-checkpoint", str(tmp_path / "missing.safetensors")])


def test_init_from_a_run_that_has_not_saved_yet_says_so(env, tmp_path):
    """A run folder with its train_config.json but no checkpoint.pt yet (a run just started)."""
    from train import stage2

    started = tmp_path / "stage1-just-started"
    started.mkdir()
    (started / "train_config.json").write_text('{"stage": "stage1"}')
    with pytest.raises(ValueError, match="no checkpoint.pt in that run folder yet"):
        stage2.main(common(env, tmp_path / "out") + ["--clip-text-encoder", env.clip, "--init-checkpoint", str(started)])


SHIPPED_CONFIGS = {  # every file of train/configs/ and the config class its command reads it with
    "stage1.yaml": "train.stage1:Stage1Config", "stage2.yaml": "train.stage2:Stage2Config",
    "stage3.yaml": "train.stage3:Stage3Config", "stage3-nano.yaml": "train.stage3:Stage3Config",
    "tiny-test.yaml": "train.stage1:Stage1Config",
    "nano/kosmosg-stage1.yaml": "train.stage1:Stage1Config", "nano/kosmosg-stage2.yaml": "train.stage2:Stage2Config",
    "nano/kosmosg-stage3.yaml": "train.stage3:Stage3Config",
    "nano/text_encoder.yaml": "train.nano.train_text_encoder:TextEncoderTrainConfig",
    "nano/text_encoder_probe.yaml": "train.nano.train_text_encoder:TextEncoderTrainConfig",
    "nano/unet.yaml": "train.nano.train_unet:UNetTrainConfig",
    "nano/unet_probe.yaml": "train.nano.train_unet:UNetTrainConfig",
    "nano/vae.yaml": "train.nano.train_vae:VaeTrainConfig", "nano/vae_probe.yaml": "train.nano.train_vae:VaeTrainConfig",
    "nano/vae_decoder.yaml": "train.nano.train_vae:VaeTrainConfig",
}


def test_every_shipped_config_is_listed():
    configs = REPO / "train" / "configs"
    on_disk = {str(p.relative_to(configs)) for p in configs.rglob("*.yaml")}
    assert on_disk == set(SHIPPED_CONFIGS)


@pytest.mark.parametrize("name", sorted(SHIPPED_CONFIGS))
def test_shipped_configs_parse(name, caplog):
    """Each shipped config parses with its command's config class (unknown keys and bad values are refused), and
    its warm-up ends before its run does."""
    import importlib

    from train.common.config import parse_config, warn_if_warmup_outlasts_run

    module, klass = SHIPPED_CONFIGS[name].split(":")
    config_class = getattr(importlib.import_module(module), klass)
    cfg = parse_config(config_class, ["--config", str(REPO / "train" / "configs" / name)])
    assert cfg != config_class()  # the file set something
    with caplog.at_level("WARNING"):
        warn_if_warmup_outlasts_run(cfg)
    assert not caplog.records


@pytest.mark.parametrize("warmup, steps, reached, fix", [
    (375, 200, "rises only to 0.000533 by the last update, short of the peak --learning-rate 0.001",
     "--warmup-steps 20 (a tenth of the run)"),
    (200, 200, "reaches the peak --learning-rate 0.001 only at the last update", "--warmup-steps 20 (a tenth of the run)"),
    (10, 10, "reaches the peak --learning-rate 0.001 only at the last update", "--warmup-steps 1 (a tenth of the run)"),
    # a run under 10 steps has no tenth: it was told "--warmup-steps 0 (a tenth of the run)"
    (375, 9, "rises only to 2.4e-05 by the last update, short of the peak --learning-rate 0.001",
     "--warmup-steps 0 (no warm-up)"),
    (199, 200, None, None),
])
def test_a_warmup_as_long_as_the_run_is_named_with_its_fix(warmup, steps, reached, fix, caplog):
    from train.common.config import warn_if_warmup_outlasts_run
    from train.loop import LoopConfig

    with caplog.at_level("WARNING"):
        warn_if_warmup_outlasts_run(LoopConfig(warmup_steps=warmup, max_steps=steps, learning_rate=1e-3))
    expected = [f"--warmup-steps {warmup} >= --max-steps {steps}: the whole run is linear warm-up, so its learning rate "
                f"{reached}. Give --warmup-steps below --max-steps, e.g. {fix}."]
    assert caplog.messages == (expected if reached else [])


def test_a_run_shorter_than_its_warmup_warns_once_as_it_starts(env, tmp_path, caplog):
    """A quick fine-tune with the official 375 warm-up steps never trains at its peak LR: said once, not per step."""
    from train import stage1

    args = common(env, tmp_path / "run", steps=2)
    del args[args.index("--warmup-steps"):args.index("--warmup-steps") + 2]  # the default: 375
    with caplog.at_level("WARNING"):
        stage1.main(args)
    assert [m for m in caplog.messages if "--warmup-steps" in m] == [
        "--warmup-steps 375 >= --max-steps 2: the whole run is linear warm-up, so its learning rate rises only to "
        "5.33e-06 by the last update, short of the peak --learning-rate 0.001. Give --warmup-steps below --max-steps, "
        "e.g. --warmup-steps 0 (no warm-up)."]


def test_record_stream_is_seeded_and_repeats_epochs(env):
    first = RecordStream(env.data, seed=3)
    keys = [first.next().key for _ in range(20)]
    same = RecordStream(env.data, seed=3)
    assert keys == [same.next().key for _ in range(20)]
    assert sorted(keys[:16]) == sorted(set(keys[:16]))  # one epoch = every sample once
    assert keys[:16] != [RecordStream(env.data, seed=4).next().key for _ in range(16)]
    again = RecordStream(env.data, seed=3)
    for _ in range(7):
        again.next()
    resumed = RecordStream(env.data, seed=3)
    resumed.load_state_dict(again.state_dict())
    assert [resumed.next().key for _ in range(13)] == keys[7:]
    longer = RecordStream(env.data, seed=3)
    two_epochs = [longer.next().key for _ in range(32)]
    per_shard = len(keys[:16]) // len(first.shards)  # a shard's records come one after another

    def shard_orders(epoch_keys):  # the set of a shard's keys -> their order
        blocks = [epoch_keys[i:i + per_shard] for i in range(0, len(epoch_keys), per_shard)]
        return {frozenset(block): block for block in blocks}

    assert shard_orders(two_epochs[16:]) != shard_orders(two_epochs[:16])  # each epoch reshuffles a shard's records...
    orders = set()
    for epoch in range(6):
        longer.epoch = epoch
        orders.add(tuple(longer._order()))
    assert len(orders) > 1  # ...and the shards
    split = [RecordStream(env.data, seed=3, rank=rank, world_size=2, split="shards").shards for rank in (0, 1)]
    assert not set(split[0]) & set(split[1]) and sorted(split[0] + split[1]) == sorted(first.shards)  # data_split=shards


def test_two_data_folders_with_the_same_keys_draw_apart(env, tmp_path):
    """Found by a review: each build numbers its samples from 00000000, and the per-sample draws (stage 1/3 choices,
    stage 3 noise) and the record shuffle were seeded by key and shard name only: `--data a,b` with two builds drew
    alike for their same-key samples. The first folder's draws are unchanged (a one-folder run is as before)."""
    copy = tmp_path / "copy"
    shutil.copytree(env.data, copy)
    alone = RecordStream(env.data, seed=3)
    first_only = [(r.key, r.sample_id) for r in (alone.next() for _ in range(16))]
    assert all(key == sample_id for key, sample_id in first_only)
    both = RecordStream(f"{env.data},{copy}", seed=3)
    records = [both.next() for _ in range(32)]  # one epoch of both folders
    by_folder = {}
    for record in records:
        by_folder.setdefault(record.sample_id.startswith("1/"), []).append(record)
    assert sorted(r.key for r in by_folder[True]) == sorted(r.key for r in by_folder[False])  # the same keys...
    assert {r.sample_id for r in by_folder[True]} == {f"1/{r.key}" for r in by_folder[False]}  # ...told apart
    assert {r.sample_id for r in by_folder[False]} == {key for key, _ in first_only}
    # the copy's shard is shuffled otherwise than the original's (its draws were the same)
    order = {folder: [r.key for r in records if r.sample_id.startswith("1/") == folder and r.shard == records[0].shard]
             for folder in (False, True)}
    assert sorted(order[False]) == sorted(order[True]) and order[False] != order[True]
    # the stages draw by sample_id: stage 3's choices and noise for the two copies of a sample
    from kosmosg_core.config import KosmosGConfig
    from train.common.config import parse_config
    from train.stage3 import Stage3, Stage3Config

    stage = Stage3(parse_config(Stage3Config, common(env, tmp_path / "unused") + ["--score-model", env.sd]))
    stage._model_cfg = KosmosGConfig.from_json(Path(env.model_config).read_text())
    drawn = []
    import train.stage3 as stage3_module

    original_rng = stage3_module.sample_rng
    try:
        stage3_module.sample_rng = lambda *parts: drawn.append(parts[-1]) or original_rng(*parts)
        twins = [next(r for r in records if r.key == records[0].key and r.sample_id.startswith("1/") == folder)
                 for folder in (False, True)]
        items = [stage.select(r) for r in twins]
    finally:
        stage3_module.sample_rng = original_rng
    assert drawn == [twins[0].sample_id, twins[1].sample_id] and twins[0].sample_id != twins[1].sample_id
    assert [item["sample_id"] for item in items] == drawn  # collate seeds each sample's noise by it
    # a checkpoint written before sample ids (no "sample_ids" in its data state) resumes as it began: exact
    resumed = RecordStream(f"{env.data},{copy}", seed=3)
    old_state = {k: v for k, v in both.state_dict().items() if k != "sample_ids"}
    resumed.load_state_dict(old_state)
    assert resumed.state_dict()["sample_ids"] == "by-key"
    assert all(r.sample_id == r.key for r in (resumed.next() for _ in range(20)))


def test_interleaved_choices_follow_official_probabilities():
    from train.inputs import choose_interleaved
    from train.common.seeds import sample_rng

    meta = {"text": "a dog <i> on a mat <i>", "text_dropped": "a <i> on a <i>",
            "entities": [{"image": "entity_0.png", "masked": "entity_0_masked.png"},
                         {"image": "entity_1.png", "masked": "entity_1_masked.png"}], "variants": 0}
    counts = Counter()
    for i in range(2000):
        choice = choose_interleaved(meta, sample_rng(0, i), drop_prob=0.5, masked_prob=0.5)
        counts["dropped"] += choice.text == meta["text_dropped"]
        counts["masked"] += sum(f.endswith("_masked.png") for f in choice.image_fields)
        assert choice.target_field == "target.png"
    assert 900 < counts["dropped"] < 1100 and 1800 < counts["masked"] < 2200
    rare = Counter()  # probabilities away from 0.5 tell p from 1 - p
    for i in range(2000):
        choice = choose_interleaved(meta, sample_rng(0, i), drop_prob=0.2, masked_prob=0.2)
        rare["dropped"] += choice.text == meta["text_dropped"]
        rare["masked"] += sum(f.endswith("_masked.png") for f in choice.image_fields)
    assert 330 < rare["dropped"] < 470 and 680 < rare["masked"] < 920
    ip2p = {"text": "a house<i>make it snowy", "text_dropped": "<i>make it snowy", "variants": 2,
            "entities": [{"name": None, "image": "entity_0.png", "masked": None}]}
    picks = Counter(choose_interleaved(ip2p, sample_rng(1, i), 0.5, 0.5).target_field for i in range(300))
    assert set(picks) == {"target.png", "variant_1_target.png", "variant_2_target.png"}
    choice = choose_interleaved(ip2p, sample_rng(1, 0), 0.5, 0.5)
    assert choice.image_fields[0].replace("entity_0.png", "target.png") == choice.target_field  # same seed's pair
    # a hand-written shard with `<i:0.2>`: refused by name, not trained at weight 1 without a word
    weighted = dict(meta, text="a dog <i:0.2> on a mat <i>")
    with pytest.raises(ValueError, match=r"writes an image weight \(<i:0.2>\); training texts take plain <i>"):
        choose_interleaved(weighted, sample_rng(0, 0), drop_prob=0.0, masked_prob=0.0)


def test_stage1_targets_skip_image_slots_and_pads():
    from train.stage1 import IGNORE_INDEX, Stage1

    ids = torch.tensor([[0, 7, 9, 9, 9, 10, 8, 2, 1]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    targets = Stage1._targets(ids, mask)  # [1, 8]
    assert targets.tolist() == [[7, 9, IGNORE_INDEX, IGNORE_INDEX, 10, 8, 2, IGNORE_INDEX]]


def test_stage1_loss_goes_down(stage1_run):
    metrics = read_metrics(stage1_run)
    losses = [m["loss"] for m in metrics]
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert mean(losses[-5:]) < 0.75 * mean(losses[:5])
    assert metrics[0]["lr"] == pytest.approx(1e-3 / 3)  # warm-up
    state = load_checkpoint(stage1_run)
    cfg = json.loads(state["extra"]["kosmosg_config"])
    assert state["step"] == 30 and cfg["decoder"]["dropout"] == 0.1
    assert tuple(state["model"]["aligner.encoder_query"].shape) == (77, CONTEXT_DIM)
    assert set(state["optimizer"]["state"])  # Adam moments saved


def test_a_run_of_the_earlier_version_resumes_with_the_dropout_it_ran_with(env, stage1_run, tmp_path, caplog):
    """Found by a review: a checkpoint written before the activation and connector dropouts were config fields was
    refused whatever the flags ("holds a model with a different KosmosGConfig"). It is read as it ran (the FFN's
    GELU output dropped with p = dropout, no connector dropout): the same dropouts as flags resume it, others are
    named. Exported files leave those fields out at 0, so earlier packs (which refuse unknown fields) read them."""
    from kosmosg_core.config import KosmosGConfig
    from train import stage1
    from train.common.checkpointing import atomic_torch_save

    run = tmp_path / "run"
    shutil.copytree(stage1_run, run)
    state = load_checkpoint(run)
    config = json.loads(state["extra"]["kosmosg_config"])
    assert config["decoder"]["activation_dropout"] == 0.0 and config["connector"]["attention_dropout"] == 0.1
    del config["decoder"]["activation_dropout"], config["connector"]["attention_dropout"]  # as the earlier version
    state["extra"]["kosmosg_config"] = json.dumps(config)
    train_config = json.loads(state["extra"]["train_config"])
    for name in ("activation_dropout", "connector_attention_dropout", "fresh_init"):  # flags it did not have
        del train_config[name]
    state["extra"]["train_config"] = json.dumps(train_config)
    atomic_torch_save(state, run / "checkpoint.pt")
    args = common(env, run, steps=31)
    with pytest.raises(ValueError, match=r"decoder.activation_dropout 0.1 -> 0.0.*started with \(its "
                                         r"--activation-dropout, --connector-attention-dropout\)"):
        stage1.main(args)
    stage1.main(args + ["--activation-dropout", "0.1", "--connector-attention-dropout", "0"])
    assert load_checkpoint(run)["step"] == 31
    exported = KosmosGConfig.from_json(config_json := KosmosGConfig.tiny().for_inference().to_json()).to_dict()
    assert "activation_dropout" not in json.loads(config_json)["decoder"]
    assert "attention_dropout" not in json.loads(config_json)["connector"] and exported["connector"]["heads"] > 0


def test_stage2_trains_only_the_aligner(stage1_run, stage2_run):
    metrics = read_metrics(stage2_run)
    losses = [m["loss"] for m in metrics]
    assert mean(losses[-5:]) < 0.75 * mean(losses[:5])
    assert all(m["loss"] == pytest.approx(m["clip_mse"] + m["reconstruction"]) for m in metrics)
    assert all(m["clip_explained"] <= 1.0 for m in metrics)  # logged every step: the alignment gate
    assert mean([m["clip_explained"] for m in metrics[-5:]]) > mean([m["clip_explained"] for m in metrics[:5]])
    before, after = load_checkpoint(stage1_run)["model"], load_checkpoint(stage2_run)["model"]
    assert not changed(before, after, "decoder.") and not changed(before, after, "vision.")
    assert not changed(before, after, "connector.")
    assert changed(before, after, "aligner.encoder")
    assert any(k.startswith("aligner.decoder_proj.") for k in after)  # reconstruction branch trained here


def test_stage2_explained_share_measures_the_between_caption_variance():
    from train.stage2 import explained_share

    target = torch.randn(8, 77, 16, generator=torch.Generator().manual_seed(0)) + 3.0
    mse = lambda prediction: torch.nn.functional.mse_loss(prediction, target)  # noqa: E731
    assert explained_share(mse(target), target).item() == pytest.approx(1.0)
    # the batch's own mean caption: biased spread = (B - 1) / B of the unbiased one -> 1 / B
    assert explained_share(mse(target.mean(0, keepdim=True).expand_as(target)), target).item() == \
        pytest.approx(1 / 8, rel=1e-5)  # float32 sums: within 1e-5 whatever the draw (it failed at 1.2e-6 on one)
    assert explained_share(mse(torch.zeros_like(target)), target).item() < -5.0  # far worse than the mean caption
    assert explained_share(torch.tensor(0.3), target[:1]).item() == 0.0  # one caption: no spread to measure


def stage3_eval_loss(env, run_dir, init_state):
    """Eval-mode loss on fixed samples and fixed noise (4 draws), before vs after training."""
    from train.common.config import parse_config
    from train.stage3 import Stage3, Stage3Config

    cfg = parse_config(Stage3Config, common(env, env.root / "unused") + ["--score-model", env.sd, "--resolution", "16"])
    stage = Stage3(cfg)
    module = stage.build(cfg, types.SimpleNamespace(device=torch.device("cpu"), num_processes=1)).eval()
    stream = RecordStream(cfg.data, cfg.seed)
    items = [stage.select(stream.next()) for _ in range(8)]
    batches = [stage.collate(items, items, step, "cpu") for step in range(4)]

    def loss(state):
        module.model.load_state_dict(state, strict=False)
        with torch.no_grad():
            return sum(module(b)[0].item() for b in batches)

    return loss(init_state), loss(load_checkpoint(run_dir)["model"])


def test_stage3_trains_the_conditioning(env, stage2_run, stage3_run):
    metrics = read_metrics(stage3_run)
    assert len(metrics) == 30 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    before = load_checkpoint(stage2_run)["model"]
    after = load_checkpoint(stage3_run)["model"]
    assert not any(k.startswith("aligner.decoder_proj.") for k in after)  # stage-2-only branch dropped
    for prefix in ("decoder.", "connector.", "aligner.encoder", "vision.resblocks.1.", "vision.ln_post."):
        assert changed(before, after, prefix), prefix
    for prefix in ("vision.resblocks.0.", "vision.conv1.", "vision.ln_pre."):
        assert not changed(before, after, prefix), prefix
    initial, final = stage3_eval_loss(env, stage3_run, before)
    assert final < 0.97 * initial


def test_stage3_caption_teacher_adds_the_text_route_target(env, stage2_run):
    """--caption-teacher-weight w adds w x MSE(condition, text encoder(caption)) per sample, the empty
    caption's states for unconditional samples; w = 0 (official) leaves the diffusion loss alone."""
    from train.common.config import parse_config
    from train.stage3 import Stage3, Stage3Config

    args = common(env, env.root / "unused") + ["--score-model", env.sd, "--resolution", "16", "--init-checkpoint",
                                               str(stage2_run), "--uncond-prob", "0.5"]
    cfg = parse_config(Stage3Config, args + ["--caption-teacher-weight", "2.0", "--clip-text-encoder", env.clip])
    stage = Stage3(cfg)
    module = stage.build(cfg, types.SimpleNamespace(device=torch.device("cpu"), num_processes=1)).eval()
    stream = RecordStream(cfg.data, cfg.seed)
    items = [item for item in (stage.select(stream.next()) for _ in range(12)) if item is not None]
    assert {it["uncond"] for it in items} == {True, False} and any(it["caption"] for it in items)
    batch = stage.collate(items, items, 0, "cpu")
    tokenize = stage.clip_tokenizer
    for it, ids in zip(items, batch["clip_ids"]):
        expected = tokenize("" if it["uncond"] else it["caption"], padding="max_length", max_length=77,
                            truncation=True, return_tensors="pt").input_ids[0]
        assert torch.equal(ids, expected)
    with torch.no_grad():
        total, metrics = module(batch)
        module.caption_teacher_weight = 0.0
        diffusion_only, _ = module(batch)
        condition = module.model(batch["input_ids"], batch["image_mask"], pixel_values=batch["pixel_values"])
        null = module.model(torch.tensor([[BOS_ID]]), torch.zeros(1, 1, dtype=torch.bool))  # the <s> condition
        condition = torch.where(batch["uncond"][:, None, None], null.expand_as(condition), condition)
        target = module.frozen["clip_text"](batch["clip_ids"]).last_hidden_state
    teacher = ((condition - target) ** 2).mean(dim=(1, 2)) * batch["has_caption"]  # [B]; 0 without a caption
    assert batch["has_caption"].tolist() == [float(it["uncond"] or bool(it["caption"])) for it in items]
    assert total.item() == pytest.approx(diffusion_only.item() + 2.0 * teacher.mean().item(), rel=1e-5)
    assert metrics["caption_mse"].item() == pytest.approx(teacher.mean().item(), rel=1e-5)
    official = Stage3(parse_config(Stage3Config, args))
    official.build(official.cfg, types.SimpleNamespace(device=torch.device("cpu"), num_processes=1))
    assert "clip_ids" not in official.collate(items, items, 0, "cpu")


def test_stage3_loss_and_gradient_are_the_per_sample_mean_as_fairseq_makes_them(env, stage2_run):
    """Found by a review: the loss was the batch's sum of per-sample MSEs, as the official diffusion wrapper returns
    it, but fairseq's trainer divides the gradients by the criterion's sample_size (the update's sample count)
    before clipping: one sample repeated 4 times must give the loss and gradient of that sample once."""
    from train.common.config import parse_config
    from train.stage3 import Stage3, Stage3Config

    args = common(env, env.root / "unused") + ["--score-model", env.sd, "--resolution", "16", "--init-checkpoint",
                                               str(stage2_run), "--uncond-prob", "0"]
    cfg = parse_config(Stage3Config, args)
    stage = Stage3(cfg)
    module = stage.build(cfg, types.SimpleNamespace(device=torch.device("cpu"), num_processes=1)).eval()
    stream = RecordStream(cfg.data, cfg.seed)
    item = next(it for it in (stage.select(stream.next()) for _ in range(12)) if it is not None)
    results = []
    for copies in (1, 4):
        module.zero_grad(set_to_none=True)
        loss, _ = module(stage.collate([item] * copies, [item] * copies, 0, "cpu"))
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
        results.append((loss.item(), grad))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert torch.allclose(results[1][1], results[0][1], rtol=1e-4, atol=1e-7)


def test_stage3_caption_teacher_trains_the_image_route(env, stage2_run):
    from train import stage3

    out = env.root / "stage3-teacher"
    stage3.main(common(env, out) + ["--score-model", env.sd, "--resolution", "16", "--init-checkpoint", str(stage2_run),
                                    "--learning-rate", "2e-3", "--caption-teacher-weight", "1.0",
                                    "--clip-text-encoder", env.clip])
    caption_mse = [m["caption_mse"] for m in read_metrics(out)]
    assert len(caption_mse) == 30 and mean(caption_mse[-8:]) < 0.8 * mean(caption_mse[:8])


@pytest.mark.parametrize("kind", ["sd", "nano"])
def test_score_model_latent_shape_is_what_the_encoder_gives(env, kind):
    """Stage 3 draws the VAE's sampling noise for latents of this shape before encoding (no extra encode)."""
    from train.score_model import load_score_model

    score = load_score_model(getattr(env, kind))
    for resolution in (16, 32):
        assert score.encode_latents(torch.zeros(1, 3, resolution, resolution)).shape[1:] == \
            score.latent_shape(resolution)


def test_stage3_refuses_a_resolution_off_the_latent_grid(env, tmp_path):
    from train import stage3

    with pytest.raises(ValueError, match="--resolution 20: use a multiple of 8"):
        stage3.main(common(env, tmp_path / "run", steps=1) + ["--score-model", env.nano, "--resolution", "20"])
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_stage3_runs_on_the_nano_score_model(env):
    from train import stage3
    from train.score_model import load_score_model

    score = load_score_model(env.nano)
    assert score.kind == "nano" and score.context_dim == CONTEXT_DIM
    latents = score.encode_latents(torch.zeros(2, 3, 16, 16))
    assert latents.shape == (2, 4, 2, 2)
    eps = score.predict_noise(latents, torch.tensor([10, 500]), torch.zeros(2, 77, CONTEXT_DIM))
    assert eps.shape == latents.shape
    out = env.root / "stage3-nano"
    stage3.main(common(env, out, steps=3) + ["--score-model", env.nano, "--resolution", "16"])
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]


def test_export_loads_in_the_core_and_encodes(env, stage3_run, tmp_path):
    from kosmosg_core.checkpoint import describe
    from kosmosg_core.pipeline import KosmosGPipeline
    from PIL import Image
    from train import export

    out = tmp_path / "mine.safetensors"
    export.main(["--checkpoint", str(stage3_run), "--tokenizer", env.tokenizer, "--out", str(out), "--dtype", "float16"])
    info = describe(out)
    assert info["dtypes"] == ["float16"] and info["tokenizer_embedded"]
    assert info["config"]["decoder"]["dropout"] == 0.0 and not info["config"]["aligner"]["with_reconstruction"]
    pipe = KosmosGPipeline.from_checkpoint(out, dtype="float32")
    cond = pipe.encode("a dog <i> on the beach", [Image.new("RGB", (40, 40), (200, 40, 40))])
    assert cond.shape == (1, 77, CONTEXT_DIM) and torch.isfinite(cond).all()
    # the exported weights are the trained ones
    trained = load_checkpoint(stage3_run)["model"]
    for name, tensor in pipe.model.state_dict().items():
        assert torch.allclose(tensor, trained[name].half().float()), name
    result = subprocess.run([sys.executable, "-m", "kosmosg_core", "encode", "--checkpoint", str(out),
                             "--prompt", "a cat", "--out", str(tmp_path / "cond.safetensors")],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"[1, 77, {CONTEXT_DIM}]" in result.stdout


def test_a_pack_init_checkpoint_keeps_its_own_config(env, stage3_run, tmp_path, caplog):
    """Found by a review: --model-config's JSON replaced the config a pack .safetensors carries (other heads, no
    embedding scaling: the tensors still fit, the model silently another); --help says it is ignored then."""
    import json

    from train import export
    from train.model_init import read_init_weights

    pack = tmp_path / "pack.safetensors"
    export.main(["--checkpoint", str(stage3_run), "--tokenizer", env.tokenizer, "--out", str(pack)])
    settings = json.loads(Path(env.model_config).read_text())
    heads = settings["decoder"]["heads"]
    settings["decoder"]["heads"] = heads * 2
    settings["decoder"]["scale_embedding"] = not settings["decoder"].get("scale_embedding", True)
    other = tmp_path / "other.json"
    other.write_text(json.dumps(settings))
    with caplog.at_level("WARNING"):
        cfg, state = read_init_weights(str(pack), str(other))
    assert cfg.decoder.heads == heads and cfg.to_json() == read_init_weights(str(pack), "official")[0].to_json()
    assert f"--model-config {other} is ignored: --init-checkpoint {pack} carries its own config" in caplog.text
    assert f"decoder.heads {heads} -> {heads * 2}" in caplog.text and "decoder.scale_embedding" in caplog.text
    caplog.clear()
    settings = json.loads(Path(env.model_config).read_text())
    settings["decoder"]["dropout"] = 0.3  # a training switch: set by the stage's flags, not the model
    other.write_text(json.dumps(settings))
    unsized = json.loads(Path(env.model_config).read_text())
    del unsized["decoder"]["vocab_size"]  # follows the tokenizer: here the pack's
    (tmp_path / "unsized.json").write_text(json.dumps(unsized))
    with caplog.at_level("WARNING"):
        read_init_weights(str(pack), env.model_config)  # the config it was trained with: nothing to say
        read_init_weights(str(pack), str(other))
        read_init_weights(str(pack), str(tmp_path / "unsized.json"))
    assert "is ignored" not in caplog.text


def test_export_of_a_stage1_run_warns_that_its_aligner_is_untrained(env, stage1_run, tmp_path, caplog):
    from train import export

    with caplog.at_level("WARNING"):
        export.main(["--checkpoint", str(stage1_run), "--out", str(tmp_path / "s1.safetensors")])
    assert "stage-1 checkpoint: its AlignerNet is untrained" in caplog.text


def test_a_file_exported_into_a_run_folder_starts_another_run_and_paths_are_checked_first(env, stage2_run, tmp_path):
    """Only checkpoint.pt marks a train/ checkpoint: a pack file exported beside it is read as a pack file
    (it was refused as "not a train/ checkpoint"). Outputs that cannot be written are named before the work."""
    import shutil

    from train import export, stage1

    run = tmp_path / "run"
    shutil.copytree(stage2_run, run)
    exported = export.main(["--checkpoint", str(run), "--out", str(run / "exported.safetensors")])
    stage1.main(common(env, tmp_path / "from-export", steps=1) + ["--init-checkpoint", str(exported)])
    before = exported.read_bytes()  # an existing --out is replaced only when asked
    with pytest.raises(ValueError, match="--out .*exported.safetensors already exists; add --overwrite true to replace"):
        export.main(["--checkpoint", str(run), "--out", str(exported), "--dtype", "float16"])
    assert exported.read_bytes() == before
    export.main(["--checkpoint", str(run), "--out", str(exported), "--dtype", "float16", "--overwrite", "true"])
    assert exported.read_bytes() != before
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="--output-dir .*a_file.txt is a file, not a folder"):
        stage1.main(common(env, a_file, steps=1))
    (tmp_path / "folder.safetensors").mkdir()
    with pytest.raises(ValueError, match="--out .*folder.safetensors is a folder"):
        export.main(["--checkpoint", str(run), "--out", str(tmp_path / "folder.safetensors")])
    config = tmp_path / "latin1.yaml"
    config.write_bytes("learning_rate: 1e-3  # r\xe9glage\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"Config file .*latin1.yaml is not UTF-8 text"):
        stage1.main(["--config", str(config)])


def test_corrupt_and_mismatched_checkpoints_are_refused(env, stage1_run, tmp_path):
    import shutil

    from train import stage1, stage3

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="corrupt or not a train/ checkpoint"):
        stage1.main(common(env, corrupt, steps=2))
    model = tmp_path / "model.safetensors"  # a model given to --resume: named where it belongs
    model.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match=r"model\.safetensors is (corrupt or )?not a train/ checkpoint .*\(a "
                                         r"\.safetensors file is a model, not a training checkpoint: a run starts "
                                         r"from one with --init-checkpoint\)"):
        stage1.main(common(env, tmp_path / "new", steps=2) + ["--resume", str(model)])
    other_stage = tmp_path / "other"
    shutil.copytree(stage1_run, other_stage)
    with pytest.raises(ValueError, match="written by 'stage1'"):
        stage3.main(common(env, other_stage, steps=2) + ["--score-model", env.sd, "--resolution", "16"])
    with pytest.raises(ValueError, match=r"different KosmosGConfig.*decoder.dropout 0.1 -> 0.2.*\(its --dropout\)"):
        stage1.main(common(env, other_stage, steps=40) + ["--dropout", "0.2"])
    deeper = json.loads(Path(env.model_config).read_text())  # and a size: the model it started from, too
    deeper["decoder"]["layers"] += 1
    (tmp_path / "deeper.json").write_text(json.dumps(deeper))
    args = common(env, other_stage, steps=40) + ["--dropout", "0.2"]
    args[args.index("--model-config") + 1] = str(tmp_path / "deeper.json")
    with pytest.raises(ValueError, match=r"decoder.layers .*\(its --dropout and the model it started from: its "
                                         r"--init-checkpoint or --model-config\)"):
        stage1.main(args)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        stage1.main(common(env, other_stage, steps=40) + ["--resume", "never"])


def test_partial_model_config_takes_the_tokenizers_vocabulary(env, tmp_path):
    """A --model-config JSON may leave fields out; decoder.vocab_size then follows the tokenizer. A wrong
    one names the config file, not 'the checkpoint's embedding' (there is no checkpoint)."""
    from train import stage1

    full = json.loads(Path(env.model_config).read_text())
    vocab = full["decoder"].pop("vocab_size")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(full))
    args = common(env, tmp_path / "run", steps=2)
    args[args.index("--model-config") + 1] = str(partial)
    stage1.main(args)
    from train.common.checkpointing import load_checkpoint

    saved = json.loads(load_checkpoint(tmp_path / "run" / "checkpoint.pt")["extra"]["kosmosg_config"])
    assert saved["decoder"]["vocab_size"] == vocab
    full["decoder"]["vocab_size"] = vocab + 5
    partial.write_text(json.dumps(full))
    args[args.index("--output-dir") + 1] = str(tmp_path / "run2")
    with pytest.raises(ValueError, match=rf"--model-config .*partial.json has decoder.vocab_size {vocab + 5} but the "
                                         rf"tokenizer in .* has {vocab} ids"):
        stage1.main(args)


def build_stage2_module(env, init_checkpoint):
    from train.common.config import parse_config
    from train.stage2 import Stage2, Stage2Config

    cfg = parse_config(Stage2Config, common(env, env.root / "unused2") + ["--clip-text-encoder", env.clip,
                                                                          "--init-checkpoint", str(init_checkpoint)])
    return Stage2(cfg).build(cfg, types.SimpleNamespace(device=torch.device("cpu"), num_processes=1))


def test_stage2_starts_a_fresh_aligner_from_stage1_and_keeps_a_stage2_one(env, stage1_run, stage2_run, tmp_path):
    # a stage-1 run whose untrained aligner was zero-initialised (what this repo's stage 1 wrote before)
    old_run = tmp_path / "stage1-old"
    shutil.copytree(stage1_run, old_run)
    state = torch.load(old_run / "checkpoint.pt", map_location="cpu", weights_only=False)
    state["model"] = {k: torch.zeros_like(v) if k.startswith("aligner.") else v for k, v in state["model"].items()}
    torch.save(state, old_run / "checkpoint.pt")
    module = build_stage2_module(env, old_run)
    assert module.model.aligner.encoder_query.std() > 0.5  # the official randn init, not the zeros
    assert torch.equal(module.model.decoder.embed_tokens.weight, state["model"]["decoder.embed_tokens.weight"])
    stage2_state = load_checkpoint(stage2_run)["model"]
    module = build_stage2_module(env, stage2_run)  # continuing an alignment keeps it
    assert torch.equal(module.model.aligner.encoder_query, stage2_state["aligner.encoder_query"])


def test_stage2_starts_from_an_official_stage1_file_without_an_aligner(env, tmp_path):
    """Found by a review: an official-format stage-1 .pt (no aligner tensors, the route stage2.yaml documents) was
    refused for its missing aligner; the official stage 2 builds a fresh one (strict=False loading)."""
    from support.official_checkpoint import build_official_state_dict, save_official_checkpoint
    from kosmosg_core.config import KosmosGConfig
    from train.common.config import parse_config
    from train.stage2 import Stage2, Stage2Config

    model_cfg = KosmosGConfig.from_json(Path(env.model_config).read_text())
    official = {k: v for k, v in build_official_state_dict(model_cfg, include_unused=False).items()
                if not k.startswith("aligner.")}
    path = save_official_checkpoint(tmp_path / "checkpoint_stage1.pt", official, with_training_state=False)
    cfg = parse_config(Stage2Config, common(env, tmp_path / "run") + [
        "--clip-text-encoder", env.clip, "--init-checkpoint", str(path)])  # common() names the --model-config
    module = Stage2(cfg).build(cfg, types.SimpleNamespace(device=torch.device("cpu"), num_processes=1))
    assert module.model.aligner.encoder_query.std() > 0.5  # fresh, official randn
    assert torch.equal(module.model.decoder.layers[0].ffn.fc1.weight, official["gpt_model.decoder.layers.0.ffn.fc1.weight"])


def test_stage2_skips_captions_as_the_official_align_filter(env, stage1_run):
    """Found by a review: only captions over 128 SentencePiece pieces were skipped; the official align mode skips
    those over 85 pieces or 75 CLIP tokens (so the CLIP target, 77 with its start and end, is never cut)."""
    from train.common.config import parse_config
    from train.stage2 import Stage2, Stage2Config

    def kept(caption, *extra):
        cfg = parse_config(Stage2Config, common(env, env.root / "unused2") + [
            "--clip-text-encoder", env.clip, "--init-checkpoint", str(stage1_run), *extra])
        stage = Stage2(cfg)
        stage.build(cfg, types.SimpleNamespace(device=torch.device("cpu"), num_processes=1))
        record = types.SimpleNamespace(key="k", epoch=0, meta={"kind": "laion", "caption": caption})
        return stage.select(record) is not None, len(stage.clip_tokenizer.tokenize(caption)), \
            len(stage.tokenizer.encode(caption))

    outcomes = set()
    for repeats in (2, 5, 12, 13, 20, 30, 45, 60):
        caption = " ".join(["dog", "cat"] * repeats)
        is_kept, clip_tokens, pieces = kept(caption, "--max-caption-tokens", "100000")
        assert is_kept == (clip_tokens <= 75), (repeats, clip_tokens)
        outcomes.add(("clip", is_kept))
        is_kept, clip_tokens, pieces = kept(caption, "--max-clip-tokens", "100000")
        assert is_kept == (pieces <= 85), (repeats, pieces)
        outcomes.add(("pieces", is_kept))
        assert kept(caption)[0] == (clip_tokens <= 75 and pieces <= 85)
    assert outcomes == {("clip", True), ("clip", False), ("pieces", True), ("pieces", False)}  # both sides tried


def test_a_fresh_aligner_follows_the_official_init_or_on_request_the_shipped_nanos(env, stage1_run):
    """Found by a review: the fresh aligner's attention was xavier-initialised with zero out_proj biases, from
    torchscale's MultiheadAttention.reset_parameters, which the official code never calls (its attention keeps
    PyTorch's Linear init). --aligner-attention-init xavier keeps the old init (the shipped nano's stage 2)."""
    from train.common.config import parse_config
    from train.stage2 import Stage2, Stage2Config

    def attention(extra):
        cfg = parse_config(Stage2Config, common(env, env.root / "unused2") + [
            "--clip-text-encoder", env.clip, "--init-checkpoint", str(stage1_run), *extra])
        return Stage2(cfg).build(cfg, types.SimpleNamespace(device=torch.device("cpu"),
                                                            num_processes=1)).model.aligner.encoder.layers[0].self_attn

    official, xavier = attention([]), attention(["--aligner-attention-init", "xavier"])
    width = official.q_proj.weight.shape[1]
    assert official.out_proj.bias.abs().max() > 0 and xavier.out_proj.bias.abs().max() == 0
    # PyTorch's Linear: U(+-1/sqrt(fan_in)), std (3 fan_in)^-1/2; xavier, gain 2^-1/2, square: std (2 fan_in)^-1/2
    assert official.q_proj.weight.std().item() == pytest.approx((3 * width) ** -0.5, rel=0.1)
    assert xavier.q_proj.weight.std().item() == pytest.approx((2 * width) ** -0.5, rel=0.1)
    with pytest.raises(ValueError, match="--aligner-attention-init 'other': use official or xavier"):
        Stage2(parse_config(Stage2Config, common(env, env.root / "unused2") + ["--aligner-attention-init", "other"]))


# --- bad inputs: named, one line, nothing lost ---------------------------------------------------------
@pytest.mark.parametrize("module, args, message", [
    ("train.stage1", ["--tokenizer", "x", "--output-dir", "OUT"], "error: Tokenizer folder x does not exist"),
    ("train.export", [], "error: --checkpoint (a train/ run folder or checkpoint.pt) and --out (.safetensors) are "
                         "required."),
    ("train.stage2", ["--config", "CONFIG", "--output-dir", "OUT"], "is not valid YAML"),
    ("train.stage1", ["--max-steps", "2", "--output-dir", "OUT", "--max-steps", "3"],
     "python -m train.stage1: error: --max-steps is given twice on the command line (2, then 3); give it once."),
])
def test_entry_points_print_one_line_errors(module, args, message, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("batch_size: [2\n")
    args = [{"CONFIG": str(config), "OUT": str(tmp_path / "out")}.get(a, a) for a in args]
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr.strip().splitlines()[-1], result.stderr


@pytest.mark.parametrize("text, message", [
    ("batch_size: [2\n", r"bad.yaml is not valid YAML \(.*line 2"),
    ("batch_size: two\n", r"bad.yaml: batch_size: expected a whole number, got 'two'"),
    ("batch_size: 2.5\n", r"batch_size: expected a whole number, got 2.5"),
    ("cpu: maybe\n", r"cpu: expected true or false, got 'maybe'"),
    ("learning_rate: fast\n", r"learning_rate: expected a number, got 'fast'"),
    ("seed: 2020-13-45\n", r"bad.yaml is not valid YAML \(month must be in 1..12"),  # was called "not valid JSON"
])
def test_config_file_errors_name_the_file_and_field(tmp_path, text, message):
    from train.common.config import parse_config
    from train.stage1 import Stage1Config

    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ValueError, match=message):
        parse_config(Stage1Config, ["--config", str(config)])
    broken_json = tmp_path / "bad.json"
    broken_json.write_text('{"batch_size": 2,}')
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        parse_config(Stage1Config, ["--config", str(broken_json)])
    whole = tmp_path / "whole.yaml"
    whole.write_text("max_steps: 2.0\nbatch_size: '3'\n")
    assert (parse_config(Stage1Config, ["--config", str(whole)]).max_steps,
            parse_config(Stage1Config, ["--config", str(whole)]).batch_size) == (2, 3)


def test_data_without_a_usable_sample_is_an_error_not_a_hang(env, tmp_path):
    from train import stage2

    with pytest.raises(ValueError, match="stage2: no sample in --data qualifies"):  # every caption is longer
        stage2.main(common(env, tmp_path / "s2", steps=2, batch=2) + ["--clip-text-encoder", env.clip,
                                                                      "--max-caption-tokens", "1"])


def test_a_setting_given_twice_is_refused_by_name_and_place(tmp_path, capsys):
    """PyYAML, json and argparse each keep the last of two values without a word. A flag over the config file's
    value is the documented precedence, not a duplicate; a list is one comma-separated flag."""
    from train.common.config import parse_config, read_config_file
    from train.eval.cli import parse_eval_config
    from train.eval.dreambench import DreamBenchConfig
    from train.stage1 import Stage1Config

    twice_yaml, twice_json = tmp_path / "twice.yaml", tmp_path / "twice.json"
    twice_yaml.write_text("learning_rate: 1.0e-4\nbatch_size: 2\nlearning_rate: 3.0e-4\n")
    twice_json.write_text('{"learning_rate": 1e-4, "batch_size": 2, "learning_rate": 3e-4}')
    with pytest.raises(ValueError, match=r"^Config file \S*twice.yaml sets 'learning_rate' twice \(lines 1 and 3\); "
                                         "keep one of them"):
        parse_config(Stage1Config, ["--config", str(twice_yaml)])
    with pytest.raises(ValueError, match=r"^Config file \S*twice.json sets 'learning_rate' twice; keep one of them"):
        parse_config(Stage1Config, ["--config", str(twice_json)])
    nested = tmp_path / "nested.yaml"  # in any mapping of the file
    nested.write_text("build:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ValueError, match=r"sets 'seed' twice \(lines 2 and 3\)"):
        read_config_file(nested)
    merged = tmp_path / "merged.yaml"  # keys a YAML merge brings in may be overridden: that is what merges are for
    merged.write_text("base: &base {seed: 1, count: 4}\nbuild:\n  <<: *base\n  seed: 2\n")
    assert read_config_file(merged)["build"] == {"seed": 2, "count": 4}
    # merges as PyYAML defines them: nested (N merges B and sets k; refused as "'k' twice (lines 1 and 6)", two
    # mappings' keys), lists (the first mapping listed wins), and a `=` key (read as text)
    for name, text in (("nested", "b: &B {k: 1}\ndefs:\n  inner: &N\n    <<: *B\n    j: 0\n    k: 2\nuse: {<<: *N}\n"),
                       ("list", "a: &A {k: 1, i: 1}\nb: &B {k: 2, j: 2}\nuse:\n  <<: [*A, *B]\n  j: 3\n"),
                       ("equals", "=: 1\nk: 2\n")):
        (tmp_path / f"{name}.yaml").write_text(text)
        assert read_config_file(tmp_path / f"{name}.yaml") == yaml.safe_load(text)
    assert read_config_file(tmp_path / "list.yaml")["use"] == {"k": 1, "i": 1, "j": 3}
    for text, lines in (("a: &A {k: 1}\nuse:\n  <<: *A\n  k: 2\n  k: 3\n", "lines 4 and 5"),  # beside a merge
                        ("a: &A {k: 1, k: 2}\nuse: {<<: *A}\n", "lines 1 and 1"),  # in a merged mapping
                        ("a: &A {k: 1}\nb: &B\n  <<: *A\n  j: 1\n  j: 2\nuse: {<<: [*B]}\n", "lines 4 and 5")):
        (tmp_path / "merge-twice.yaml").write_text(text)
        with pytest.raises(ValueError, match=rf"sets '[kj]' twice \({lines}\)"):
            read_config_file(tmp_path / "merge-twice.yaml")

    for argv, flag, values in ((["--learning-rate", "1e-4", "--batch-size", "2", "--learning-rate=3e-4"],
                                "--learning-rate", "(0.0001, then 0.0003)"),
                               (["--config", str(merged), "--config", str(nested)], "--config",
                                f"({str(merged)!r}, then {str(nested)!r})")):
        with pytest.raises(SystemExit) as exit_info:
            parse_config(Stage1Config, argv)
        assert exit_info.value.code == 2
        assert f"error: {flag} is given twice on the command line {values}; give it once." in capsys.readouterr().err
    once = tmp_path / "once.yaml"
    once.write_text("learning_rate: 1.0e-4\n")
    assert parse_config(Stage1Config, ["--config", str(once), "--learning-rate", "3e-4"]).learning_rate == 3e-4
    assert parse_eval_config(DreamBenchConfig, ["--subjects", "dog,cat"], "dreambench", "").subjects == ["dog", "cat"]
    with pytest.raises(SystemExit):
        parse_eval_config(DreamBenchConfig, ["--subjects", "dog", "--subjects", "cat"], "dreambench", "")
    assert "python -m train.eval dreambench: error: --subjects is given twice" in capsys.readouterr().err


def test_train_data_refuses_a_setting_given_twice_and_keeps_set_repeatable(tmp_path, capsys):
    from train.data import cli

    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["mix", "--seed", "1", "--seed", "2"])
    assert "error: --seed is given twice on the command line (1, then 2); give it once." in capsys.readouterr().err
    config = cli.resolve_config(parser.parse_args(["build", "--set", "seed=2", "--set", "models.dtype=float16",
                                                   "--seed", "3"]))  # --set repeats, a flag over --set: precedence
    assert (config.seed, config.models.dtype) == (3, "float16")
    assert cli.main(["build", "--set", "seed=2", "--set", "seed=5"]) == 2
    assert "error: --set seed is given twice on the command line; give it once." in capsys.readouterr().err
    # a section's mapping and a key inside it that set one entry (either order): the last won without a word
    for sets in (["crop={entity_size: 128}", "crop.entity_size=256"], ["crop.entity-size=256", "crop={entity-size: 4}"]):
        assert cli.main(["build", "--set", sets[0], "--set", sets[1]]) == 2
        first, second = (s.split("=")[0] for s in sets)
        assert (f"error: --set {first} and --set {second} both set crop.entity_size: the last would win without a "
                "word; set it once.") in capsys.readouterr().err
    # a mapping is merged entry by entry: other entries of the same section do not collide
    config = cli.resolve_config(parser.parse_args(["build", "--set", "crop={square_crop: false}", "--set",
                                                   "crop.entity_size=256"]))
    assert (config.crop.square_crop, config.crop.entity_size) == (False, 256)
    config = cli.resolve_config(parser.parse_args(["build", "--set", "source=folder", "--set",
                                                   "source_options={a: 1}"]))  # names that only start alike
    assert (config.source, config.source_options) == ("folder", {"a": 1})
    assert cli.main(["build", "--source", "nano-world", "--labels-from", "folder"]) == 2  # two names of one setting
    assert "error: --source and --labels-from both set source; give one of them." in capsys.readouterr().err


def test_an_abbreviated_flag_is_refused_not_taken_for_a_longer_one(tmp_path, capsys):
    """argparse's prefix matching took `--lr 0.5` for `--lr-power 0.5` and trained at the default LR."""
    from train.common.config import parse_config
    from train.data.cli import main as data_main
    from train.stage1 import Stage1Config

    with pytest.raises(SystemExit) as exit_info:
        parse_config(Stage1Config, ["--lr", "0.5"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --lr 0.5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        data_main(["mix", "--out", str(tmp_path / "mixed")])  # --output
    assert exit_info.value.code == 2 and "unrecognized arguments: --out" in capsys.readouterr().err
    from train.nano import judge, nano_tokenizer, world  # their own parsers

    for main, args in ((judge.main, ["--sample", "3"]), (nano_tokenizer.main, ["--ou", str(tmp_path / "tok")]),
                       (world.main, ["--ou", str(tmp_path / "pairs"), "--count", "1"])):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        error = capsys.readouterr().err  # "unrecognized arguments: --sample" or, first, "required: --out"
        assert exit_info.value.code == 2 and ("unrecognized arguments: " + args[0] in error or "required: --out" in error)


@pytest.mark.parametrize("stage, args, message", [
    ("stage1", ["--learning-rate", "0"], "--learning-rate 0.0: must be above 0"),  # was a ZeroDivisionError
    ("stage1", ["--learning-rate", "inf"], "--learning-rate inf: must be a finite number"),  # trained to NaN
    ("stage1", ["--end-learning-rate", "nan"], "--end-learning-rate nan: must be a finite number"),
    ("stage1", ["--clip-norm", "nan"], "--clip-norm nan: must be a finite number"),  # clipping silently off
    ("stage1", ["--clip-norm", "-1"], "--clip-norm -1.0: must be at least 0"),
    ("stage1", ["--lr-power", "-1"], "--lr-power -1.0: must be at least 0"),
    ("stage1", ["--warmup-steps", "-5"], "--warmup-steps -5: must be at least 0"),
    ("stage1", ["--adam-beta2", "1"], "--adam-beta2 1.0: must be from 0 to below 1"),  # torch's check came after
    ("stage1", ["--weight-decay", "-1"], "--weight-decay -1.0: must be at least 0"),  # the model was built
    ("stage1", ["--mixed-precision", "fp32"], "--mixed-precision 'fp32': use no, fp16 or bf16"),
    ("stage1", ["--masked-entity-prob", "2"], "--masked-entity-prob 2.0: must be at most 1"),
    ("stage2", ["--batch-size", "0"], "--batch-size 0: must be at least 1"),  # was "max() arg is an empty sequence"
    ("stage2", ["--max-steps", "0"], "--max-steps 0: must be at least 1"),  # was a run that wrote nothing
    ("stage2", ["--max-caption-tokens", "0"], "--max-caption-tokens 0: must be at least 1"),
    ("stage2", ["--kinds", "lion"], "--kinds 'lion': name sample kinds from laion, instructpix2pix, openimage"),
    ("stage2", ["--kinds", " , "], "--kinds ' , ': name sample kinds from"),
    ("stage1", ["--dropout", "2"], "--dropout 2.0: must be at most 1"),  # was refused by the model config
    ("stage3", ["--resolution", "0"], "--resolution 0: use a multiple of 8"),  # was checked after the data listing
    ("stage3", ["--uncond-prob", "nan"], "--uncond-prob nan: must be a finite number"),
    ("stage3", ["--drop-caption-prob", "-1"], "--drop-caption-prob -1.0: must be at least 0"),
    ("stage3", ["--caption-teacher-weight", "-1"], "--caption-teacher-weight -1.0: must be at least 0"),
])
def test_settings_out_of_range_are_refused_by_flag_before_data_or_models(stage, args, message, tmp_path):
    """No --data: each error comes before the data is looked at, so before any model loads."""
    import importlib

    from support.train_fixtures import tiny_tokenizer

    with pytest.raises(ValueError, match=re.escape(message)):
        importlib.import_module(f"train.{stage}").main(["--tokenizer", str(tiny_tokenizer(tmp_path)), "--output-dir",
                                                        str(tmp_path / "run")] + args)


@pytest.mark.parametrize("stage, args, message", [
    ("stage1", ["--learning-rate", "0"], "--learning-rate 0.0: must be above 0"),
    ("stage2", ["--kinds", "laoin"], "--kinds 'laoin': name sample kinds from"),
    ("stage2", ["--aligner-attention-init", "glorot"], "--aligner-attention-init 'glorot': use official or xavier"),
    ("stage3", ["--score-model", "sd", "--resolution", "100"], "--resolution 100: use a multiple of 8"),
    ("stage3", [], "--score-model is required"),
])
def test_a_bad_setting_is_named_before_the_tokenizer_loads(stage, args, message, tmp_path):
    """Found by reviews: --learning-rate 0 (then stage 2's --kinds, stage 3's --resolution) came after the tokenizer
    was read, so a user with both problems got two rounds."""
    import importlib

    with pytest.raises(ValueError, match=re.escape(message)):
        importlib.import_module(f"train.{stage}").main(["--tokenizer", str(tmp_path / "not-there"), "--output-dir",
                                                        str(tmp_path / "run")] + args)


@pytest.mark.parametrize("config_class, field_name, value", [
    ("train.nano.train_unet:UNetTrainConfig", "uncond_prob", 1.5),
    ("train.nano.train_unet:UNetTrainConfig", "ema_decay", -0.1),
    ("train.nano.train_vae:VaeTrainConfig", "subject_crop_prob", 2.0),
    ("train.nano.train_text_encoder:TextEncoderTrainConfig", "learning_rate", float("nan")),
])
def test_nano_probabilities_and_numbers_are_checked_when_parsed(config_class, field_name, value, tmp_path):
    import importlib

    from train.common.config import parse_config

    module, klass = config_class.split(":")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({field_name: value}).replace("NaN", '"nan"'))
    with pytest.raises(ValueError, match=f"^--{field_name.replace('_', '-')} {value}: must be "):
        parse_config(getattr(importlib.import_module(module), klass), ["--config", str(config)])


def test_a_huge_whole_number_setting_is_not_an_overflow_crash():
    """The finite-number check called math.isfinite on ints too: 10**400 raised a bare OverflowError."""
    from train.common.config import parse_config
    from train.stage1 import Stage1Config

    assert parse_config(Stage1Config, ["--max-steps", "1" + "0" * 400]).max_steps == 10 ** 400


def test_stage3_caption_teacher_without_its_text_encoder_is_refused_before_the_score_model_loads(env, tmp_path,
                                                                                                  monkeypatch):
    from train import stage3

    def no_load(*args):
        raise AssertionError("the score model was loaded before the settings were checked")

    monkeypatch.setattr(stage3, "load_score_model", no_load)
    with pytest.raises(ValueError, match="^--caption-teacher-weight 0.5 needs --clip-text-encoder"):
        stage3.main(common(env, tmp_path / "run", steps=1) + ["--score-model", env.sd, "--resolution", "16",
                                                              "--caption-teacher-weight", "0.5"])


def test_resume_refuses_changed_settings_by_name(env, stage1_run, tmp_path):
    from train import stage1, stage2

    run = tmp_path / "run"
    shutil.copytree(stage1_run, run)
    saved = (run / "train_config.json").read_text()
    for extra, message in ((["--learning-rate", "0.01"], r"learning_rate 0.001 -> 0.01"),
                           (["--seed", "5"], r"seed 0 -> 5"),
                           (["--masked-entity-prob", "0.2"], r"masked_entity_prob 0.5 -> 0.2"),
                           (["--gradient-accumulation-steps", "2"], r"global batch .* 4 -> 8")):
        with pytest.raises(ValueError, match=message):
            stage1.main(common(env, run, steps=40) + extra)
    assert (run / "train_config.json").read_text() == saved  # the record still says what the run is
    with pytest.raises(ValueError, match="written by 'stage1'"):  # the stage is named before any tensor check
        stage2.main(common(env, run, steps=40) + ["--clip-text-encoder", env.clip])
    other = tmp_path / "other"
    shutil.copytree(stage1_run, other)
    with pytest.raises(ValueError, match="holds its own checkpoint"):
        stage1.main(common(env, other, steps=40) + ["--resume", str(run)])
    with pytest.raises(ValueError, match="not there: "):  # the same number of shards, other names
        moved = tmp_path / "moved-data"
        shutil.copytree(env.data, moved)
        for shard in sorted(moved.glob("*.tar"))[:1]:
            shard.rename(shard.with_name("renamed-" + shard.name))
        stage1.main(common(env, run, steps=40)[2:] + ["--data", str(moved)])


def test_damaged_metrics_line_and_non_checkpoint_files(tmp_path):
    from train.common.checkpointing import load_checkpoint
    from train.common.metrics import MetricsLog

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.9}\n{"step": 3, "lo')  # cut by a crash
    MetricsLog(tmp_path, 2)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
    not_a_checkpoint = tmp_path / "train_config.json"
    not_a_checkpoint.write_text("{}")
    with pytest.raises(ValueError, match="train_config.json is corrupt or not a train/ checkpoint") as error:
        load_checkpoint(not_a_checkpoint)
    assert "weights_only" not in str(error.value)


def test_samples_with_corrupt_image_bytes_are_skipped_with_a_warning(env, tmp_path, caplog):
    """A damaged PNG inside a sample (truncated, bit-flipped) is skipped when selected; it used to end the
    run when the batch was collated."""
    import io
    import tarfile

    from train import stage1, stage3

    data = tmp_path / "data"
    shutil.copytree(env.data, data)
    source = sorted(data.glob("*.tar"))[0]
    with tarfile.open(source) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    keys = sorted({name.split(".")[0] for name, _ in members})[:2]
    damaged = []
    with tarfile.open(data / "zz-damaged.tar", "w") as tar:
        for name, payload in members:
            key, field = name.split(".", 1)
            if key not in keys:
                continue
            if field.endswith(".png"):  # first sample: truncated PNGs; second: one flipped byte (bad CRC)
                payload = payload[:len(payload) // 2] if key == keys[0] else \
                    payload[:60] + bytes([payload[60] ^ 0xFF]) + payload[61:]
            info = tarfile.TarInfo(f"zz{key}.{field}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
            damaged.append(f"zz{key}")
    for stage, extra in ((stage1, []), (stage3, ["--score-model", env.nano, "--resolution", "16"])):
        args = common(env, tmp_path / f"run-{stage.__name__}", steps=8, batch=4) + extra
        args[args.index("--data") + 1] = str(data)
        caplog.clear()
        with caplog.at_level("WARNING"):
            stage.main(args)  # 8 updates x 4 samples: every shard read at least once
        for key in keys:
            assert f"skipping sample zz{key} of shard zz-damaged.tar:" in caplog.text
        assert "is not a readable image" in caplog.text


def test_a_shard_that_vanishes_stops_the_stream_it_is_not_skipped(env, tmp_path):
    """Only a damaged shard is skipped: a missing file or an I/O error is not the shard's fault, and skipping it
    would drop its records from this pass alone (the run would no longer equal its resume)."""
    data = tmp_path / "data"
    shutil.copytree(env.data, data)
    stream = RecordStream(str(data), seed=0)
    for shard in data.glob("*.tar"):
        shard.unlink()
    with pytest.raises(ValueError, match=r"cannot be read \(FileNotFoundError: .*make it readable again, then resume"):
        stream.next()


def test_malformed_samples_are_skipped_and_unreadable_shards_named(env, tmp_path, caplog):
    import io
    import tarfile

    from train import stage1

    data = tmp_path / "data"
    shutil.copytree(env.data, data)
    with tarfile.open(data / "zz-raw-img2dataset.tar", "w") as tar:  # not kosmosg-data: no json per sample
        for key in ("0001", "0002"):
            for ext, payload in (("txt", b"a caption"), ("jpg", b"\xff\xd8 not decoded here")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    args = common(env, tmp_path / "run", steps=8, batch=4)
    args[args.index("--data") + 1] = str(data)
    with caplog.at_level("WARNING"):
        stage1.main(args)  # 8 updates x 4 samples: every shard read at least once
    assert "skipping sample 0001 of shard zz-raw-img2dataset.tar: no field 'json'" in caplog.text
    # a shard that is not a tar, one cut short by a killed copy, an empty file: skipped with a warning (a run
    # used to end when it reached one, possibly hours in, and could not resume without that shard)
    (data / "zz-raw-img2dataset.tar").write_bytes(b"this is not a tar file" * 40)
    whole = sorted(data.glob("shard-*.tar"))[0].read_bytes()
    (data / "zz-truncated.tar").write_bytes(whole[:len(whole) // 2 + 100])
    (data / "zz-empty.tar").write_bytes(b"")
    args[args.index("--output-dir") + 1] = str(tmp_path / "run2")
    caplog.clear()
    with caplog.at_level("WARNING"):
        stage1.main(args)
    assert re.search(r"zz-raw-img2dataset.tar cannot be read past its first 0 records .*not a tar file or is "
                     r"truncated", caplog.text)
    assert re.search(r"zz-truncated.tar cannot be read past its first [1-9]", caplog.text)  # its whole records used
    assert "zz-empty.tar cannot be read past its first 0 records" in caplog.text
    args[args.index("--data") + 1] = f"{data / 'zz-raw-img2dataset.tar'},{data / 'zz-empty.tar'}"  # nothing usable
    args[args.index("--output-dir") + 1] = str(tmp_path / "run3")
    with pytest.raises(ValueError, match=r"hold no samples \(or cannot be read"):
        stage1.main(args)


def test_samples_whose_json_has_fields_of_another_type_are_skipped(env, tmp_path, caplog):
    """A record whose json is null or a list, or holds a number or null where text or a list belongs, is skipped
    with a warning like a missing field (TypeError / AttributeError used to end the run in select)."""
    import io
    import tarfile

    from train import stage1

    data = tmp_path / "data"
    shutil.copytree(env.data, data)
    with tarfile.open(sorted(data.glob("*.tar"))[0]) as tar:
        png = next(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png"))
    metas = {"json_null": None, "json_list": [1, 2], "caption_number": {"kind": "laion", "caption": 5, "text": 5},
             "entities_null": {"kind": "openimage", "caption": "a dog", "text": "a dog <i>", "entities": None}}
    with tarfile.open(data / "zz-odd-types.tar", "w") as tar:
        for key, meta in metas.items():
            for field, payload in (("json", json.dumps(meta).encode()), ("target.png", png)):
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    args = common(env, tmp_path / "run", steps=8, batch=4) + ["--image-text-pairs", "true"]
    args[args.index("--data") + 1] = str(data)
    with caplog.at_level("WARNING"):
        stage1.main(args)  # 8 updates x 4 samples: every shard read at least once
    reasons = {"json_null": "its json is a NoneType, not an object", "json_list": "its json is a list, not an object",
               "caption_number": "its json field 'caption' is 5, not text",
               "entities_null": "its json field 'entities' is None, not a list"}
    for key, reason in reasons.items():
        assert f"skipping sample {key} of shard zz-odd-types.tar: {reason}" in caplog.text, key


def test_a_truncated_jpeg_in_a_sample_is_caught_before_collate():
    """Image fields hold PNG (docs/data-format.md); a shard from another writer may hold JPEG, whose `verify`
    passes a truncated file that then failed to decode in collate, ending the run."""
    import io

    import numpy as np
    from PIL import Image

    from train.inputs import check_images_readable

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    whole = buffer.getvalue()
    check_images_readable({"target.png": whole}, ["target.png"], "k")
    with pytest.raises(ValueError, match="target.png is not a readable image .*image file is truncated"):
        check_images_readable({"target.png": whole[:-50]}, ["target.png"], "k")  # the header intact: it opens


def test_training_inputs_layout_and_ranges():
    import io

    from PIL import Image

    from kosmosg_core.config import EOS_ID
    from kosmosg_core.tokenizer import KosmosGTokenizer
    from support.tokenizer_fixture import build_tiny_tokenizer
    from train.inputs import prompt_with_eos, target_pixels

    def png(color, size):
        buffer = io.BytesIO()
        Image.new("RGB", size, color).save(buffer, format="PNG")
        return buffer.getvalue()

    white, black = target_pixels(png("white", (40, 20), ), 16, "w"), target_pixels(png("black", (20, 40)), 16, "b")
    assert white.shape == black.shape == (3, 16, 16)
    assert torch.all(white == 1.0) and torch.all(black == -1.0)  # the VAE's range, [-1, 1]
    split = Image.new("RGB", (40, 20), "black")  # left half black, right half white: a centred crop keeps
    split.paste(Image.new("RGB", (20, 20), "white"), (20, 0))  # the edge in the middle
    buffer = io.BytesIO()
    split.save(buffer, format="PNG")
    crop = target_pixels(buffer.getvalue(), 16, "s")
    assert torch.all(crop[:, :, :7] == -1.0) and torch.all(crop[:, :, 9:] == 1.0)
    assert torch.allclose(crop[:, :, 7], -crop[:, :, 8])  # the resize blurs the edge symmetrically
    # found by a review: the longer side was int(long * R / short) where torchvision takes int(R * long / short):
    # 1 px short for some sizes (588 x 392 at 768 -> 767), which moved the crop; now torchvision's own pixels
    import numpy as np
    from torchvision import transforms

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (392, 588, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    official = transforms.Compose([transforms.Resize(768), transforms.CenterCrop(768)])(noise)  # official 'diff'
    expected = torch.from_numpy(np.asarray(official, dtype=np.float32).transpose(2, 0, 1).copy()) / 127.5 - 1.0
    assert torch.equal(target_pixels(buffer.getvalue(), 768, "n"), expected)

    tokenizer = KosmosGTokenizer.from_dir(build_tiny_tokenizer(Path(__import__("tempfile").mkdtemp()) / "tok"))
    prompt = prompt_with_eos(tokenizer, "<i> a dog", 1, 4)
    assert prompt.ids[0] == BOS_ID and prompt.ids[-1] == EOS_ID and prompt.image_mask[-1] is False
    assert prompt.image_mask[2:6] == [True] * 4  # <s> <image> [4 slots] </image> a dog </s>


def test_stage1_trains_the_mllm_connector_and_last_vision_block_only(env):
    from train.common.config import parse_config
    from train.stage1 import Stage1, Stage1Config

    cfg = parse_config(Stage1Config, common(env, env.root / "unused"))
    module = Stage1(cfg).build(cfg, types.SimpleNamespace(device=torch.device("cpu")))
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    model = next(m for m in module.modules() if type(m).__name__ == "KosmosG")
    last = f"resblocks.{len(model.vision.resblocks) - 1}."
    for name, parameter in model.named_parameters():
        part = name.split(".")[0]
        expected = part in ("decoder", "connector") or (part == "vision" and (last in name or "ln_post" in name))
        assert parameter.requires_grad == expected, name
    assert trainable and any(last in name for name in trainable)


def test_stage3_skips_long_laion_captions_and_gives_ip2p_no_caption_target(env):
    """Found by a review: the official LAION loader skips captions over 128 pieces in stage 3 (ours kept them); and
    the caption teacher's target for an InstructPix2Pix sample was its input caption, which describes the source
    image, not the target."""
    import dataclasses

    from kosmosg_core.config import KosmosGConfig
    from train.common.config import parse_config
    from train.stage3 import Stage3, Stage3Config, caption_teacher_targets

    assert parse_config(Stage3Config, ["--score-model", env.sd]).max_laion_caption_tokens == 128  # official
    cfg = parse_config(Stage3Config, common(env, env.root / "unused") + ["--score-model", env.sd,
                                                                         "--max-laion-caption-tokens", "20"])
    stage = Stage3(cfg)
    stage._model_cfg = KosmosGConfig.from_json(Path(env.model_config).read_text())
    stream = RecordStream(env.data, seed=0)
    records = [stream.next() for _ in range(16)]
    laion = next(r for r in records if r.meta["kind"] == "laion")
    captions = [" ".join(["dog"] * words) for words in range(1, 12)]
    for caption in captions:
        kept = len(stage.tokenizer.encode(caption)) <= 20
        meta = {**laion.meta, "caption": caption, "text": caption, "text_dropped": caption}
        record = dataclasses.replace(laion, fields={**laion.fields, "json": json.dumps(meta).encode()})
        assert (stage.select(record) is not None) == kept, caption
    assert {len(stage.tokenizer.encode(c)) <= 20 for c in captions} == {True, False}  # both sides tried
    ip2p = [stage.select(r) for r in records if r.meta["kind"] == "instructpix2pix"]
    assert ip2p and all(r.meta["caption"] for r in records if r.meta["kind"] == "instructpix2pix")
    conditional = [dict(item, uncond=False) for item in ip2p]
    assert caption_teacher_targets(conditional) == ([""] * len(ip2p), [0.0] * len(ip2p))


def test_stage3_samples_follow_the_configured_probabilities(env):
    from kosmosg_core.config import KosmosGConfig
    from kosmosg_core.prompt import build_prompt_ids
    from train.common.config import parse_config
    from train.stage3 import Stage3, Stage3Config

    cfg = parse_config(Stage3Config, common(env, env.root / "unused") + ["--score-model", env.sd])
    assert (cfg.uncond_prob, cfg.drop_caption_prob) == (0.1, 0.5)  # official
    stage = Stage3(cfg)
    stage._model_cfg = KosmosGConfig.from_json(Path(env.model_config).read_text())
    stream, counts, laion_uncond = RecordStream(env.data, seed=0), Counter(), {}
    for _ in range(480):  # 30 epochs of the tiny set
        record = stream.next()
        item = stage.select(record)
        counts["uncond"] += item["uncond"]
        if record.meta.get("kind") == "laion":  # same draws per sample: only the key tells their streams apart
            laion_uncond.setdefault(record.epoch, set()).add(item["uncond"])
        meta = record.meta
        if meta.get("text_dropped") and meta["text_dropped"] != meta["text"]:
            counts["droppable"] += 1
            dropped = build_prompt_ids(stage.tokenizer, meta["text_dropped"], len(item["fields"]),
                                       stage._model_cfg.image_token_slots)
            counts["dropped"] += item["prompt"].ids == dropped.ids
    assert 0.05 < counts["uncond"] / 480 < 0.16
    assert any(len(values) == 2 for values in laion_uncond.values())  # samples of one epoch draw independently
    assert counts["droppable"] > 100 and 0.38 < counts["dropped"] / counts["droppable"] < 0.62


@pytest.mark.parametrize("stage_name", ["stage1", "stage2", "stage3"])
def test_prompts_beyond_the_models_positions_are_skipped(env, stage_name, caplog):
    """Every stage skips (and logs) a record whose prompt is longer than the model reads (here: the aligner's
    position table), instead of the model raising in the middle of training."""
    import importlib

    from kosmosg_core.config import ALIGNER_FIRST_POSITION, KosmosGConfig
    from train.common.config import parse_config
    from train.model_init import load_clip_text, replace_config

    module = importlib.import_module(f"train.{stage_name}")
    extra = {"stage2": ["--clip-text-encoder", env.clip], "stage3": ["--score-model", env.sd]}.get(stage_name, [])
    cfg = parse_config(getattr(module, f"Stage{stage_name[-1]}Config"), common(env, env.root / "unused") + extra)
    stage = getattr(module, f"Stage{stage_name[-1]}")(cfg)
    stage._model_cfg = KosmosGConfig.from_json(Path(env.model_config).read_text())
    if stage_name == "stage2":  # its caption filter counts CLIP tokens too (`build` loads the tokenizer)
        stage.clip_tokenizer = load_clip_text(env.clip)[0]
    stream = RecordStream(env.data, seed=0)
    records = [stream.next() for _ in range(16)]  # the tiny set, every kind
    # what the model reads: stage 1 feeds all but the last token (the next-token targets end with </s>)
    reads = {r.key: len(item["prompt"]) - (stage_name == "stage1") for r in records
             if (item := stage.select(r)) is not None}
    shortest = min(records, key=lambda r: reads.get(r.key, 10**9))
    full = stage._model_cfg

    def with_limit(tokens):
        stage._model_cfg = replace_config(full, aligner={"max_positions": ALIGNER_FIRST_POSITION + tokens})
        assert stage._model_cfg.max_prompt_tokens == tokens

    with_limit(reads[shortest.key])  # exactly at the limit: kept
    assert stage.select(shortest) is not None
    with_limit(reads[shortest.key] - 1)
    assert stage.select(shortest) is None
    with_limit(3)
    with caplog.at_level("INFO", logger="train.loop"):
        assert [stage.select(record) for record in records] == [None] * 16
    assert "tokens > the model's 3" in caplog.text


def test_stage2_loss_terms_and_padding(env, stage2_run):
    import torch.nn.functional as F

    from kosmosg_core.config import PAD_ID
    from train.model_init import clip_token_ids, load_clip_text

    module = build_stage2_module(env, stage2_run).eval()
    ids = torch.tensor([[BOS_ID, 7, 8, 9, 10, 11], [BOS_ID, 12, 13, PAD_ID, PAD_ID, PAD_ID]])  # [B=2, T=6]
    seen = {}
    aligner_forward = module.model.aligner.forward

    def spy(hidden, padding_mask=None):
        seen["padding_mask"] = padding_mask
        return aligner_forward(hidden, padding_mask=padding_mask)

    module.model.aligner.forward = spy
    clip_tokenizer, _ = load_clip_text(env.clip)
    clip_ids = clip_token_ids(clip_tokenizer, ["a dog", "a cat"], 77)
    with torch.no_grad():
        total, parts = module({"input_ids": ids, "clip_ids": clip_ids})
        assert torch.equal(seen["padding_mask"], ids.eq(PAD_ID))  # pads are masked in the aligner
        hidden = module.model.mllm_hidden(ids, torch.zeros_like(ids, dtype=torch.bool)).float()
        context = aligner_forward(hidden, padding_mask=ids.eq(PAD_ID))
        expected = F.mse_loss(module.model.aligner.reconstruct(context, 6).float(), hidden) * 77 / 6  # official 77/T
    assert parts["reconstruction"] == pytest.approx(expected.item() / module.num_shares, rel=1e-5)
    assert total == pytest.approx((parts["clip_mse"] + parts["reconstruction"]).item(), rel=1e-6)


def test_stage3_noise_timesteps_and_caption_targets():
    from train.common.seeds import sample_generator
    from train.stage3 import caption_teacher_targets, draw_diffusion_noise

    def generators():
        return [sample_generator(0, "noise", 1, 0, f"key{i}") for i in range(64)]

    latent_noise, noise, timesteps = draw_diffusion_noise(generators(), (4, 2, 2), 1000)
    assert latent_noise.shape == noise.shape == (64, 4, 2, 2) and timesteps.shape == (64,)
    assert timesteps.min() < 250 and timesteps.max() > 750 and 350 < timesteps.float().mean() < 650  # uniform
    assert not torch.allclose(noise, latent_noise)  # the diffusion noise is its own draw
    again = draw_diffusion_noise(generators(), (4, 2, 2), 1000)
    assert all(torch.equal(a, b) for a, b in zip(again, (latent_noise, noise, timesteps)))  # per sample, seeded
    items = [{"uncond": True, "caption": ""}, {"uncond": True, "caption": "a dog"}, {"uncond": False, "caption": ""},
             {"uncond": False, "caption": "a cat"}]
    assert caption_teacher_targets(items) == (["", "", "", "a cat"], [1.0, 1.0, 0.0, 1.0])


def test_training_dropout_is_where_the_official_model_applies_it(env):
    """Found by a review: the FFN's GELU output was dropped with p = dropout (torchscale's activation_dropout is 0;
    its FFN drops only its output, our layer's residual dropout), the MLLM's attention with 0.1 (the official
    self-attention runs through xformers, which applies none) and the connector's attention never (official 0.1)."""
    from train.common.config import parse_config
    from train.stage1 import Stage1, Stage1Config

    cfg = parse_config(Stage1Config, common(env, env.root / "unused"))
    assert (cfg.dropout, cfg.attention_dropout, cfg.activation_dropout, cfg.connector_attention_dropout) == \
        (0.1, 0.0, 0.0, 0.1)
    module = Stage1(cfg).build(cfg, types.SimpleNamespace(device=torch.device("cpu"))).train()
    model = next(m for m in module.modules() if type(m).__name__ == "KosmosG")
    layer = model.decoder.layers[0]
    assert layer.dropout.p == 0.1 and layer.self_attn.dropout == 0.0 and model.connector.x_attn.dropout == 0.1
    torch.manual_seed(0)
    x = torch.randn(2, 5, model.cfg.decoder.width)
    assert not torch.equal(layer(x), layer(x))  # the residual dropout is on
    assert torch.equal(layer.ffn(x), layer.ffn(x))  # but nothing inside the FFN is dropped
    image_tokens = torch.randn(1, model.cfg.vision.num_tokens, model.cfg.vision.width)
    assert not torch.equal(model.connector(image_tokens), model.connector(image_tokens))  # its attention drops
    model.eval()
    assert torch.equal(model.connector(image_tokens), model.connector(image_tokens))


def test_a_fresh_mllm_starts_as_torchscale_builds_it(env):
    """Found by a review: a model built from --model-config lacked torchscale's subLN init (fc1, fc2, out_proj,
    v_proj times sqrt(log(2 x layers))) and the connector's random queries (zeros: its outputs all equal at the
    start). --fresh-init unscaled keeps the earlier init (the shipped nano's stage 1), draw for draw."""
    import math

    from train.common.config import parse_config
    from train.stage1 import Stage1, Stage1Config

    def fresh(extra):
        cfg = parse_config(Stage1Config, common(env, env.root / "unused") + extra)
        torch.manual_seed(0)  # run_training seeds the init so
        module = Stage1(cfg).build(cfg, types.SimpleNamespace(device=torch.device("cpu")))
        return next(m for m in module.modules() if type(m).__name__ == "KosmosG")

    official, unscaled = fresh([]), fresh(["--fresh-init", "unscaled"])
    scale = math.sqrt(math.log(2 * official.cfg.decoder.layers))
    layer, plain = official.decoder.layers[0], unscaled.decoder.layers[0]
    for name in ("ffn.fc1.weight", "ffn.fc2.bias", "self_attn.out_proj.weight", "self_attn.v_proj.weight"):
        assert torch.allclose(layer.get_parameter(name), plain.get_parameter(name) * scale), name  # same seed
    assert torch.equal(layer.self_attn.q_proj.weight, plain.self_attn.q_proj.weight)
    assert unscaled.connector.latent_query.abs().max() == 0 and 0.5 < official.connector.latent_query.std() < 1.5
    # the connector's attention as fairseq's MultiheadAttention initialises itself: xavier, zero out_proj bias
    attention, width = official.connector.x_attn, official.cfg.decoder.width
    assert attention.out_proj.bias.abs().max() == 0 and unscaled.connector.x_attn.out_proj.bias.abs().max() > 0
    assert attention.q_proj.weight.abs().max() <= (6 / (2 * width)) ** 0.5 * 2 ** -0.5 + 1e-6
    with pytest.raises(ValueError, match="--fresh-init 'other': use official or unscaled"):
        from train.loop import run_training

        cfg = parse_config(Stage1Config, common(env, env.root / "unused") + ["--fresh-init", "other"])
        run_training(Stage1(cfg), cfg)


def test_stage2_runs_the_frozen_mllm_in_training_mode_as_the_official_stage(env, stage1_run):
    """Found by a review: the frozen MLLM was put in eval mode (deterministic targets); the official stage 2 calls
    model.train() on the whole model, so its dropout (0.1) perturbs the aligner's input and reconstruction target.
    --mllm-dropout 0 gives deterministic targets."""
    from train.common.config import parse_config
    from train.stage2 import Stage2, Stage2Config

    def hidden_twice(extra):
        cfg = parse_config(Stage2Config, common(env, env.root / "unused2") + [
            "--clip-text-encoder", env.clip, "--init-checkpoint", str(stage1_run), *extra])
        module = Stage2(cfg).build(cfg, types.SimpleNamespace(device=torch.device("cpu"), num_processes=1)).train()
        assert module.model.decoder.training
        ids = torch.tensor([[0, 5, 6, 7, 8]])
        with torch.no_grad():
            return [module.model.mllm_hidden(ids, torch.zeros_like(ids, dtype=torch.bool)) for _ in range(2)]

    assert not torch.equal(*hidden_twice([]))
    assert torch.equal(*hidden_twice(["--mllm-dropout", "0"]))


def test_stage1_samples_put_the_image_first_and_keep_every_entity_word(env):
    from kosmosg_core.config import EOS_ID, KosmosGConfig
    from kosmosg_core.prompt import build_prompt_ids
    from train.common.config import parse_config
    from train.stage1 import Stage1, Stage1Config

    cfg = parse_config(Stage1Config, common(env, env.root / "unused"))
    stage = Stage1(cfg)
    stage._model_cfg = KosmosGConfig.from_json(Path(env.model_config).read_text())
    slots, stream, kinds = stage._model_cfg.image_token_slots, RecordStream(env.data, seed=0), Counter()
    for _ in range(160):  # 10 epochs
        record = stream.next()
        item, meta = stage.select(record), record.meta
        ids = item["prompt"].ids
        assert ids[-1] == EOS_ID
        if meta.get("kind") == "laion":  # an image-caption pair: <s> <image> [slots] </image> caption </s>
            assert item["prompt"].image_mask[2:2 + slots] == [True] * slots and item["fields"] == ["target.png"]
            assert ids[1] == stage.tokenizer.image_id and ids[2 + slots] == stage.tokenizer.image_end_id
        elif meta.get("text_dropped") and meta["text_dropped"] != meta["text"]:  # stage 1 never drops entity words
            kinds["entity"] += 1
            dropped = build_prompt_ids(stage.tokenizer, meta["text_dropped"], len(item["fields"]), slots).ids
            assert ids[:-1] != dropped
        kinds[meta.get("kind")] += 1
    assert kinds["laion"] > 10 and kinds["entity"] > 10


def test_training_steps_clip_gradients_and_draw_fresh_dropout(env, tmp_path, monkeypatch):
    from train import stage1

    def run(name, *flags):
        out = tmp_path / name
        stage1.main(with_flags(common(env, out, steps=2, batch=16) + ["--log-every", "1"], *flags))
        return read_metrics(out), load_checkpoint(out)["model"]

    # the same first batch with and without dropout: the loss differs only if the module trains in train mode
    with_dropout, _ = run("dropout")
    without, _ = run("no-dropout", "--dropout", "0", "--attention-dropout", "0")
    assert abs(with_dropout[0]["loss"] - without[0]["loss"]) > 1e-4
    seeds = []  # each step seeds its dropout masks anew
    real_manual_seed = torch.manual_seed
    monkeypatch.setattr(torch, "manual_seed", lambda seed: seeds.append(seed) or real_manual_seed(seed))
    run("seeded", "--max-steps", "3")
    monkeypatch.undo()
    assert len(seeds) >= 3 and len(set(seeds[-3:])) == 3
    _, clipped = run("clipped", "--clip-norm", "1e-6")
    _, free = run("free", "--clip-norm", "0")
    assert changed(clipped, free, "decoder.")  # clipping to a tiny norm changes the update


def test_stage3_trains_the_unconditional_embedding_too(env, stage2_run):
    from train.common.config import parse_config
    from train.stage3 import Stage3, Stage3Config

    cfg = parse_config(Stage3Config, common(env, env.root / "unused") + ["--score-model", env.sd, "--resolution", "16",
                                                                         "--init-checkpoint", str(stage2_run)])
    stage = Stage3(cfg)
    module = stage.build(cfg, types.SimpleNamespace(device=torch.device("cpu"), num_processes=1)).train()
    stream = RecordStream(cfg.data, cfg.seed)
    items = [dict(stage.select(stream.next()), uncond=True) for _ in range(2)]  # both unconditional
    batch = stage.collate(items, items, 0, "cpu")
    module(batch)[0].backward()
    # the official code recomputes the <s>-only condition with gradients: its embedding row learns
    assert module.model.decoder.embed_tokens.weight.grad[BOS_ID].abs().sum() > 0


def test_stage2_resumes_with_its_kinds_in_another_order(env, tmp_path):
    """From a review: --kinds is a set to the stage, but 'openimage,laion' was refused as another setting than
    'laion,openimage'; another set of kinds still is."""
    from train import stage2

    run = tmp_path / "s2"
    stage2.main(common(env, run, steps=2, batch=2) + ["--clip-text-encoder", env.clip, "--kinds", "laion,openimage"])
    stage2.main(common(env, run, steps=3, batch=2) + ["--clip-text-encoder", env.clip, "--kinds", "openimage, laion"])
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1] == 3
    with pytest.raises(ValueError, match="other settings than this run's: kinds"):
        stage2.main(common(env, run, steps=4, batch=2) + ["--clip-text-encoder", env.clip, "--kinds", "laion"])
    # the frozen MLLM's dropout is stage 2's own flag (found by a review: the refusal named stage 1's)
    with pytest.raises(ValueError, match=r"decoder.dropout 0.1 -> 0.0.*\(its --mllm-dropout\)"):
        stage2.main(common(env, run, steps=4, batch=2) + ["--clip-text-encoder", env.clip, "--kinds", "laion,openimage",
                                                          "--mllm-dropout", "0"])
