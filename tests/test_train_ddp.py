"""Two processes (gloo on CPU) with 2 samples each == one process with 4 samples: same loss curve
and same weights (DDP averages gradients; the stages hand back shares of the global objective,
data is sliced from one global stream and padded to the global batch's length). Started with
torchrun, with `accelerate launch --multi_gpu` (CPU processes on a machine without a GPU), and with
gradient accumulation (2 processes x 1 sample x 2 micro-batches)."""

import importlib
import subprocess
import sys

import pytest
import torch

from support.train_fixtures import assert_same_training, common_args, launch_processes, make_env, subprocess_env
from train.common.checkpointing import load_checkpoint
from train.common.metrics import read_metrics
from train.loop import LoopConfig, build_accelerator

STEPS = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("ddp"))


def stage_args(env, stage: str) -> list[str]:
    # dropout masks are per process by design
    extra = ["--dropout", "0", "--attention-dropout", "0", "--connector-attention-dropout", "0"]
    if stage == "stage3":
        extra += ["--score-model", env.sd, "--resolution", "16", "--uncond-prob", "0.3"]
    return extra


def one_process_run(env, stage: str):
    """The 1-process reference (4 samples per update), run once per module."""
    out = env.root / f"{stage}-one"
    if not (out / "checkpoint.pt").exists():
        importlib.import_module(f"train.{stage}").main(common_args(env, out, steps=STEPS, batch=4, save_every=4)
                                                       + stage_args(env, stage))
    return out


@pytest.mark.parametrize("stage,launcher", [("stage1", "torchrun"), ("stage3", "accelerate")])
def test_two_processes_match_one(env, stage, launcher):
    one, two = one_process_run(env, stage), env.root / f"{stage}-two"
    launch_processes(f"train.{stage}", common_args(env, two, steps=STEPS, batch=2, save_every=4)
                     + stage_args(env, stage), launcher=launcher)
    assert [m["world_size"] for m in read_metrics(two)] == [2] * STEPS
    assert_same_training(one, two)
    assert load_checkpoint(two)["data"]["world_size"] == 2


def test_two_processes_accumulating_match_one(env):
    """DDP skips the gradient all-reduce for all but the last micro-batch; the update is unchanged."""
    one, two = one_process_run(env, "stage1"), env.root / "stage1-two-accumulating"
    launch_processes("train.stage1", common_args(env, two, steps=STEPS, batch=1, save_every=4)
                     + stage_args(env, "stage1") + ["--gradient-accumulation-steps", "2"])
    assert_same_training(one, two)


def test_accelerate_cpu_flag_with_several_processes_is_refused(monkeypatch, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process (it leaves multi-CPU to mpirun):
    the loop says so instead of training alone."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ValueError, match="--multi_gpu --num_processes N"):
        build_accelerator(LoopConfig(output_dir=str(tmp_path)), find_unused_parameters=False)


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_launched_worker_skips_interpreter_teardown_after_success(world_size):
    """`run_as_script`: a launched worker (WORLD_SIZE > 1) that finished ends with os._exit(0) after
    flushing (a rare abort in gloo/FSDP teardown must not fail a finished run); one process exits
    normally; a failing main still exits non-zero."""
    script = ("import atexit, sys\nfrom train.loop import run_as_script\n"
              "atexit.register(lambda: print('teardown ran', flush=True))\n"
              "run_as_script(lambda: print('trained', end='') if sys.argv[1] == 'ok' else 1 / 0)\n")
    env = {**subprocess_env(), "WORLD_SIZE": world_size}
    ok = subprocess.run([sys.executable, "-c", script, "ok"], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == ("trained" if world_size == "2" else "trainedteardown ran\n")
    failed = subprocess.run([sys.executable, "-c", script, "fail"], env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "ZeroDivisionError" in failed.stderr
    assert "teardown ran" in failed.stdout


@pytest.mark.parametrize("main_process", [True, False])
def test_only_the_main_process_writes_the_checkpoint(tmp_path, main_process):
    """Under DDP/FSDP every process calls `save_run_checkpoint`, but only process 0 holds the gathered
    state (the others get empty dicts): a second writer would replace checkpoint.pt with an empty model."""
    import types

    from kosmosg_core.config import KosmosGConfig
    from train.loop import save_run_checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    waits = []
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)  # fp16's loss scaler: saved with the run (fp16 on a GPU)
    accelerator = types.SimpleNamespace(is_main_process=main_process, num_processes=2, scaler=scaler,
                                        wait_for_everyone=lambda: waits.append(True))
    stage = types.SimpleNamespace(name="stage1", model_config=KosmosGConfig.tiny, tokenizer_dir=lambda: "tok")
    stream = types.SimpleNamespace(state_dict=lambda: {"epoch": 0})
    save_run_checkpoint(accelerator, stage, model, optimizer, scheduler, stream, 4, LoopConfig(output_dir=str(tmp_path)))
    assert waits == [True]  # every process waits for the writer before going on
    if main_process:
        state = load_checkpoint(tmp_path)
        assert state["step"] == 4 and torch.equal(state["model"]["weight"], model.weight)
        assert state["grad_scaler"] == scaler.state_dict()
    else:
        assert list(tmp_path.iterdir()) == []
