"""Gradient accumulation: an update of 2 micro-batches of 4 samples equals one of a single batch of 8
(same weights within 1e-5) for every stage: stage 1 normalises by the update's target tokens, stage 2
averages its micro-batch means, stage 3 sums per-sample losses."""

import importlib

import pytest

from support.train_fixtures import assert_same_training, common_args, make_env
from train.loop import micro_batches

STEPS = 6


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("accumulation"))


def stage_args(env, stage: str) -> list[str]:
    no_dropout = ["--dropout", "0", "--attention-dropout", "0", "--connector-attention-dropout", "0"]
    extra = {"stage1": no_dropout,
             "stage2": ["--clip-text-encoder", env.clip, "--mllm-dropout", "0"],
             "stage3": [*no_dropout, "--score-model", env.sd, "--resolution", "16", "--uncond-prob", "0.3"]}
    return extra[stage]


def test_micro_batches_are_equal_consecutive_parts():
    assert micro_batches(list(range(8)), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert micro_batches(list(range(6)), 1) == [list(range(6))]


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_two_micro_batches_of_4_equal_one_batch_of_8(env, stage):
    main = importlib.import_module(f"train.{stage}").main
    whole, accumulated = env.root / f"{stage}-batch8", env.root / f"{stage}-4x2"
    main(common_args(env, whole, steps=STEPS, batch=8, save_every=3) + stage_args(env, stage))
    main(common_args(env, accumulated, steps=STEPS, batch=4, save_every=3) + stage_args(env, stage)
         + ["--gradient-accumulation-steps", "2"])
    assert_same_training(whole, accumulated)
