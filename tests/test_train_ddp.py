"""Two processes (torchrun, gloo on CPU) with 2 samples each == one process with 4 samples:
same loss curve and same weights (DDP averages gradients; the stages hand back shares of the global
objective, data is sliced from one global stream and padded to the global batch's length)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support.train_fixtures import common_args, make_env, subprocess_env
from train.common.checkpointing import load_checkpoint
from train.loop import read_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("ddp"))


def launch_two(module: str, args: list[str], port: int):
    command = [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", module] + args
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def assert_equivalent(one: Path, two: Path):
    single, double = read_metrics(one), read_metrics(two)
    assert [m["world_size"] for m in double] == [2] * STEPS and [m["world_size"] for m in single] == [1] * STEPS
    for a, b in zip(single, double):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    ref, got = load_checkpoint(one)["model"], load_checkpoint(two)["model"]
    for name, tensor in ref.items():
        assert torch.allclose(tensor, got[name], rtol=1e-4, atol=1e-5), name
    assert load_checkpoint(two)["data"]["world_size"] == 2


@pytest.mark.parametrize("stage", ["stage1", "stage3"])
def test_two_processes_match_one(env, stage):
    import importlib

    extra = ["--dropout", "0", "--attention-dropout", "0"]  # dropout masks are per process by design
    if stage == "stage3":
        extra += ["--score-model", env.sd, "--resolution", "16", "--uncond-prob", "0.3"]
    one, two = env.root / f"{stage}-one", env.root / f"{stage}-two"
    importlib.import_module(f"train.{stage}").main(common_args(env, one, steps=STEPS, batch=4, save_every=4) + extra)
    launch_two(f"train.{stage}", common_args(env, two, steps=STEPS, batch=2, save_every=4) + extra,
               port=29600 + (stage == "stage3"))
    assert_equivalent(one, two)
