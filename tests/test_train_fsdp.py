"""FSDP (`--distributed fsdp`, FSDP2 over 2 CPU processes with gloo) trains like one process, and its
checkpoints hold the whole model and optimiser state: a run killed mid-way resumes under FSDP to the
uninterrupted FSDP run (within 1e-6) and under 1 process to the 1-process run, a 1-process checkpoint
resumes under FSDP, and export reads the FSDP checkpoint.

Stage 1 runs with text-only laion samples and 1 sample per process, so some updates give the vision
tower gradients on one process only (FSDP must reduce zeros for it, as DDP's find_unused_parameters
does); stage 3 computes the unconditional embedding only when some sample of the update needs it."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from support.train_fixtures import assert_same_training, common_args, launch_command, launch_processes, make_env, \
    run_stage1_in_process, subprocess_env
from train.common.checkpointing import load_checkpoint
from train.common.metrics import read_metrics
from train.loop import SIGKILL_AT_STEP_ENV

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 8, 4
STAGE1 = ["--dropout", "0", "--attention-dropout", "0", "--connector-attention-dropout", "0",  # per-process masks
          "--image-text-pairs", "false"]
FSDP = ["--distributed", "fsdp"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("fsdp"))


def args(env, out, batch: int) -> list[str]:
    return common_args(env, out, steps=STEPS, batch=batch, save_every=SAVE_EVERY) + STAGE1


def run_one_process(env, out, crash_at=None) -> list[int]:
    """stage1 in this process (2 samples per update), optionally crashing after update `crash_at` -> updates run."""
    return run_stage1_in_process(args(env, out, batch=2), crash_at)


@pytest.fixture(scope="module")
def one_process(env):
    run_one_process(env, env.root / "one")
    return env.root / "one"


@pytest.fixture(scope="module")
def fsdp_run(env):
    out = env.root / "fsdp"
    launch_processes("train.stage1", args(env, out, batch=1) + FSDP)
    return out


def test_fsdp_two_processes_match_one(env, one_process, fsdp_run, tmp_path):
    from safetensors.torch import load_file

    from train import export

    assert [m["world_size"] for m in read_metrics(fsdp_run)] == [2] * STEPS
    assert_same_training(one_process, fsdp_run)
    saved = load_checkpoint(fsdp_run)
    assert saved["data"]["world_size"] == 2
    assert saved["optimizer"]["param_groups"][0]["params"] == load_checkpoint(one_process)["optimizer"][
        "param_groups"][0]["params"]  # keyed by index like a 1-process optimizer.state_dict()
    exported = load_file(str(export.main(["--checkpoint", str(fsdp_run), "--out", str(tmp_path / "fsdp.safetensors")])))
    name = "decoder.layers.0.self_attn.k_proj.weight"
    assert any(torch.equal(tensor, saved["model"][name]) for key, tensor in exported.items() if key.endswith(name))


def test_killed_fsdp_run_resumes_under_fsdp_and_under_one_process(env, one_process, fsdp_run):
    killed = env.root / "fsdp-killed"
    # every process SIGKILLs itself after update SAVE_EVERY + 2 is logged (an outside kill races the run)
    result = subprocess.run(launch_command("train.stage1", args(env, killed, batch=1) + FSDP), cwd=REPO,
                            env={**subprocess_env(), SIGKILL_AT_STEP_ENV: str(SAVE_EVERY + 2)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert load_checkpoint(killed)["step"] == SAVE_EVERY < read_metrics(killed)[-1]["step"] == SAVE_EVERY + 2 < STEPS, \
        "the run must die mid-training, after a checkpoint"
    under_one = env.root / "fsdp-killed-then-one-process"
    shutil.copytree(killed, under_one)

    launch_processes("train.stage1", args(env, killed, batch=1) + FSDP)  # --resume auto
    assert_same_training(fsdp_run, killed, loss_rtol=1e-6, weight_atol=1e-6)

    assert run_one_process(env, under_one) == list(range(SAVE_EVERY + 1, STEPS + 1))
    assert [m["world_size"] for m in read_metrics(under_one)] == [2] * SAVE_EVERY + [1] * (STEPS - SAVE_EVERY)
    assert_same_training(one_process, under_one)


def test_one_process_checkpoint_resumes_under_fsdp(env, one_process):
    crashed = env.root / "one-crashed-then-fsdp"
    with pytest.raises(KeyboardInterrupt):
        run_one_process(env, crashed, crash_at=SAVE_EVERY + 1)
    assert load_checkpoint(crashed)["step"] == SAVE_EVERY
    launch_processes("train.stage1", args(env, crashed, batch=1) + FSDP)
    assert [m["world_size"] for m in read_metrics(crashed)] == [1] * SAVE_EVERY + [2] * (STEPS - SAVE_EVERY)
    assert_same_training(one_process, crashed)


def test_fsdp_stage3_matches_one_process(env):
    from train import stage3

    extra = ["--score-model", env.sd, "--resolution", "16", "--uncond-prob", "0.3", "--dropout", "0",
             "--attention-dropout", "0", "--connector-attention-dropout", "0"]
    one, two = env.root / "stage3-one", env.root / "stage3-fsdp"
    stage3.main(common_args(env, one, steps=4, batch=4, save_every=4) + extra)
    launch_processes("train.stage3", common_args(env, two, steps=4, batch=2, save_every=4) + extra + FSDP)
    assert_same_training(one, two)


def test_accelerate_use_fsdp_selects_train_fsdp(env, one_process):
    """`accelerate launch --use_fsdp` (accelerate's FSDP switch) trains with train/'s FSDP2 sharding."""
    import json

    out = env.root / "accelerate-fsdp"
    command = launch_command("train.stage1", args(env, out, batch=1), launcher="accelerate")
    command[command.index("--multi_gpu")] = "--use_fsdp"  # accelerate takes one of the two
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((out / "train_config.json").read_text())["distributed"] == "fsdp"
    assert [m["world_size"] for m in read_metrics(out)] == [2] * STEPS
    assert_same_training(one_process, out)
