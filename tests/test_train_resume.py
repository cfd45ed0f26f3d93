"""Exact resume: a run killed with SIGKILL and resumed reproduces the uninterrupted run's losses and
weights (decisions.md: same thread count, within 1e-6)."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from support.argv import with_flags
from support.train_fixtures import common_args, make_env, run_stage1_in_process, subprocess_env
from train.common.checkpointing import load_checkpoint
from train.common.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS = 40


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("resume"))


def stage3_args(env, out):
    # dropout and CFG dropout on, so every random stream (dropout masks, drops, noise) is exercised
    return common_args(env, out, steps=STEPS, save_every=5) + [
        "--score-model", env.sd, "--resolution", "16", "--uncond-prob", "0.5", "--dropout", "0.1"]


def assert_same_run(reference: Path, resumed: Path):
    ref, res = read_metrics(reference), read_metrics(resumed)
    assert [m["step"] for m in res] == list(range(1, STEPS + 1))  # the killed run's extra lines were dropped
    for a, b in zip(ref, res):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
        assert a["lr"] == b["lr"]
    ref_state, res_state = load_checkpoint(reference), load_checkpoint(resumed)
    for name, tensor in ref_state["model"].items():
        assert torch.allclose(tensor, res_state["model"][name], rtol=0, atol=1e-6), name
    assert ref_state["data"] == res_state["data"]


def test_sigkill_then_resume_matches_uninterrupted_run(env):
    from train import stage3

    reference = env.root / "reference"
    stage3.main(stage3_args(env, reference))

    killed = env.root / "killed"
    process = subprocess.Popen([sys.executable, "-m", "train.stage3"] + stage3_args(env, killed), cwd=REPO,
                               env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            try:
                metrics = read_metrics(killed)
            except ValueError:  # a line read while it was being written: look again
                continue
            if metrics and metrics[-1]["step"] >= 17:
                break
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    last_logged = read_metrics(killed)[-1]["step"]
    checkpoint_step = load_checkpoint(killed)["step"]
    assert process.returncode == -signal.SIGKILL
    assert 5 <= checkpoint_step <= last_logged < STEPS, "the run must die mid-training, after a checkpoint"

    # --resume auto picks up killed/checkpoint.pt: the first step it runs is the one after it
    from train.common.config import parse_config
    from train.loop import run_training
    from train.stage3 import Stage3, Stage3Config

    cfg = parse_config(Stage3Config, stage3_args(env, killed))
    steps_run = []
    run_training(Stage3(cfg), cfg, on_step=lambda step, metrics: steps_run.append(step))
    assert steps_run == list(range(checkpoint_step + 1, STEPS + 1))
    assert_same_run(reference, killed)


def test_ctrl_c_is_one_line_saying_how_to_go_on(env, tmp_path):
    """Found by a review: Ctrl-C printed a 30-line KeyboardInterrupt traceback."""
    out = tmp_path / "run"
    # SIGINT as a terminal's: pytest-xdist's workers ignore it, and a child that starts with it ignored (inherited)
    # gets no KeyboardInterrupt from Python
    process = subprocess.Popen([sys.executable, "-m", "train.stage1"] + common_args(env, out, steps=10_000, save_every=2),
                               cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None and load_checkpoint(out) is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.rstrip().endswith("interrupted (Ctrl-C): the updates after the last checkpoint are not kept; run the "
                                    "same command again to resume from it (--save-every sets how often one is "
                                    "written)"), stderr[-3000:]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_crash_then_resume_stage1_matches(env, accumulation):
    """Stage 1 (interleaved images, token-count denominators) interrupted in-process by an exception;
    with 2 micro-batches per update too (the position is counted in updates)."""
    def run(out, crash_at=None):
        args = common_args(env, out, steps=STEPS, batch=4 // accumulation, save_every=5)
        return run_stage1_in_process(args + ["--gradient-accumulation-steps", str(accumulation)], crash_at)

    reference, crashed = env.root / f"s1-reference-{accumulation}", env.root / f"s1-crashed-{accumulation}"
    run(reference)
    with pytest.raises(KeyboardInterrupt):
        run(crashed, crash_at=23)
    assert load_checkpoint(crashed)["step"] == 20
    assert run(crashed) == list(range(21, STEPS + 1))
    assert_same_run(reference, crashed)


def test_a_resume_that_splits_the_batch_otherwise_warns_when_dropout_is_on(env, tmp_path, caplog):
    """Found by a review: dropout's masks follow the split of the global batch, so batch 2 x 2 after 4 x 1 goes on
    with other draws (losses 0.05 apart); allowed, and said. Without dropout the split changes nothing (the
    accumulation tests), and nothing is said."""
    for off in ([], ["--dropout", "0", "--connector-attention-dropout", "0"]):
        out = tmp_path / f"run{len(off)}"
        with pytest.raises(KeyboardInterrupt):
            run_stage1_in_process(common_args(env, out, steps=6, batch=4, save_every=3) + off, crash_at=4)
        caplog.clear()
        with caplog.at_level("WARNING"):
            run_stage1_in_process(common_args(env, out, steps=6, batch=2, save_every=3) + off +
                                  ["--gradient-accumulation-steps", "2"])
        warned = ("resuming with the global batch split otherwise (batch_size x gradient_accumulation_steps x "
                  "processes 4 x 1 x 1 -> 2 x 2 x 1): with dropout on (decoder.dropout 0.1, "
                  "connector.attention_dropout 0.1) its masks follow the split") in caplog.text
        assert warned == (not off), caplog.text


def test_a_loss_scaled_run_resumes_its_scale_through_the_training_loop(env, tmp_path, monkeypatch):
    """The loop saves the loss scaler with the run and a resume restores it (a review noticed the scaler's own test
    would pass with the loop's wiring removed). fp16's scaler exists only on a GPU: here torch's CPU GradScaler, set
    on the loop's accelerator, doubles its scale every 2 updates; a run stopped at 3 and resumed to 6 ends at the
    uninterrupted run's scale and losses."""
    from train import loop

    build = loop.build_accelerator

    def with_scaler(cfg, find_unused_parameters):
        accelerator = build(cfg, find_unused_parameters)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=2)
        return accelerator

    monkeypatch.setattr(loop, "build_accelerator", with_scaler)

    def run(out, steps):
        run_stage1_in_process(common_args(env, out, steps=steps, save_every=3))
        return load_checkpoint(out)

    whole = run(tmp_path / "whole", 6)
    assert whole["grad_scaler"]["scale"] == 32.0  # 4, doubled after updates 2, 4 and 6
    assert run(tmp_path / "resumed", 3)["grad_scaler"]["scale"] == 8.0
    resumed = run(tmp_path / "resumed", 6)
    assert resumed["grad_scaler"] == whole["grad_scaler"]
    assert [m["loss"] for m in read_metrics(tmp_path / "resumed")] == [m["loss"] for m in read_metrics(tmp_path / "whole")]


def test_resume_with_other_max_steps_uses_the_new_schedule_from_its_first_update(env, tmp_path):
    """--max-steps may change on resume: the first resumed update took the old schedule's LR (0.0 when a
    finished run was extended). A --max-steps below the checkpoint's step is refused (it trained nothing and
    rewrote the run's record)."""
    from train import stage1
    from train.loop import polynomial_decay

    out = tmp_path / "run"
    args = with_flags(common_args(env, out, steps=6, save_every=3), "--warmup-steps", "2", "--learning-rate", "1e-3")
    stage1.main(args)
    stage1.main(args[:args.index("--max-steps")] + ["--max-steps", "10"] + args[args.index("--max-steps") + 2:])
    lrs = {m["step"]: m["lr"] for m in read_metrics(out)}
    assert lrs[6] == pytest.approx(polynomial_decay(5, 2, 6, 1e-3, 0.0, 1.0)) == 0.0  # the first run's last update
    for step in (7, 8, 10):
        assert lrs[step] == pytest.approx(polynomial_decay(step - 1, 2, 10, 1e-3, 0.0, 1.0)), step
    record = (out / "train_config.json").read_text()
    with pytest.raises(ValueError, match=r"is at step 10, beyond --max-steps 4; give --max-steps 10 or more"):
        stage1.main(args[:args.index("--max-steps")] + ["--max-steps", "4"] + args[args.index("--max-steps") + 2:])
    assert (out / "train_config.json").read_text() == record


@pytest.mark.parametrize("stage", ["stage1", "stage3"])
def test_resume_may_switch_gradient_checkpointing(env, tmp_path, stage):
    """--gradient-checkpointing is how a run computes, not what: a run resumed with it switched on goes on
    exactly as the run without it (the stages write the switch into the model config, which is compared)."""
    import importlib

    main = importlib.import_module(f"train.{stage}").main
    extra = ["--score-model", env.sd, "--resolution", "16"] if stage == "stage3" else []
    args = common_args(env, tmp_path / "plain", steps=6, save_every=3) + extra
    main(args)
    switched = [str(tmp_path / "switched") if a == str(tmp_path / "plain") else a for a in args]
    main(switched[:switched.index("--max-steps")] + ["--max-steps", "3"] + switched[switched.index("--max-steps") + 2:])
    main(switched + ["--gradient-checkpointing", "true"])
    plain, resumed = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "switched")
    assert [m["step"] for m in resumed] == list(range(1, 7))
    for a, b in zip(plain, resumed):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6), (a, b)


def test_a_resumed_run_may_find_its_frozen_models_moved(env, tmp_path):
    """Paths may change on resume (the files are checked by content): stage 3's --score-model folder moved,
    the run goes on; another setting that defines the run (--uncond-prob) is still refused by name."""
    import shutil

    from train import stage3

    args = common_args(env, tmp_path / "run", steps=3, save_every=2) + ["--score-model", env.sd, "--resolution", "16"]
    stage3.main(args[:args.index("--max-steps")] + ["--max-steps", "2"] + args[args.index("--max-steps") + 2:])
    moved = shutil.copytree(env.sd, tmp_path / "moved-sd")
    args[args.index("--score-model") + 1] = str(moved)
    stage3.main(args)
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]
    with pytest.raises(ValueError, match="other settings than this run's: uncond_prob 0.1 -> 0.5"):
        stage3.main(args[:args.index("--max-steps")] + ["--max-steps", "4"] + args[args.index("--max-steps") + 2:]
                    + ["--uncond-prob", "0.5"])
    # from a review: a frozen model (or tokenizer) of other content in the same place was taken without a word
    weights = max((p for p in moved.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    with pytest.raises(ValueError, match=r"--score-model .*moved-sd holds other files \(their contents differ"):
        stage3.main(args[:args.index("--max-steps")] + ["--max-steps", "4"] + args[args.index("--max-steps") + 2:])


def test_a_folder_named_like_the_checkpoint_is_one_clear_error(env, tmp_path):
    """From a review: it was a bare AttributeError deep in the resume check."""
    from train import stage1

    (tmp_path / "run" / "checkpoint.pt").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"checkpoint.pt is a folder; the run writes its checkpoint file there"):
        stage1.main(common_args(env, tmp_path / "run", steps=2, save_every=2))


def test_resume_refuses_other_shards_of_the_same_names_or_their_order(env, tmp_path):
    """From a review: every build names its shards shard-000000.tar..., so another dataset of as many shards, or
    two datasets given the other way round, resumed without a word. Moved shards still resume."""
    import shutil

    from train.records import RecordStream

    state = RecordStream(env.data, seed=0).state_dict()
    RecordStream(str(shutil.copytree(env.data, tmp_path / "moved")), seed=0).load_state_dict(state)
    other = shutil.copytree(env.data, tmp_path / "other")
    last = sorted(other.glob("*.tar"))[-1]
    with open(last, "ab") as f:
        f.write(bytes(1024))
    with pytest.raises(ValueError, match=rf"shard {len(state['shard_names'])}, {last.name}, has other content"):
        RecordStream(str(other), seed=0).load_state_dict(state)
    both = RecordStream(f"{env.data},{other}", seed=0).state_dict()
    with pytest.raises(ValueError, match=r"is another of them \(the same shards in another order\)"):
        RecordStream(f"{other},{env.data}", seed=0).load_state_dict(both)
    # a shard the run found damaged may be rebuilt before the resume (what the damage warning advises)
    damaged = shutil.copytree(env.data, tmp_path / "damaged")
    shard = sorted(damaged.glob("*.tar"))[-1]
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    stream = RecordStream(str(damaged), seed=0)
    while stream.epoch == 0:
        stream.next()
    state = stream.state_dict()
    assert state["damaged_shards"] == [len(state["shard_names"]) - 1]
    shutil.copy(sorted(Path(env.data).glob("*.tar"))[-1], shard)  # rebuilt
    RecordStream(str(damaged), seed=0).load_state_dict(state)


def test_a_second_process_training_into_the_same_folder_is_refused(env, tmp_path):
    """Two runs into one folder interleaved their checkpoints and metrics (e.g. a relaunch while the workers of
    a killed launcher still ran). The lock is held while a run trains, then released."""
    from train import stage1
    from train.common.checkpointing import run_folder_lock

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from train.common.checkpointing import run_folder_lock\n"
                               "with run_folder_lock(sys.argv[2]):\n    print('locked', flush=True); time.sleep(60)",
                               str(REPO), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"Another process \(pid {holder.pid}\) is training into"):
            stage1.main(common_args(env, out, steps=2, save_every=2))
    finally:
        holder.kill()
        holder.wait()
    stage1.main(common_args(env, out, steps=2, save_every=2))  # free once the other process is gone
    with run_folder_lock(out):  # and free again after this process's run ended
        with run_folder_lock(out):  # nested use in one process is fine
            pass


def fake_msvcrt():
    """A stand-in for Windows' msvcrt module that locks as `msvcrt.locking` does: `nbytes` bytes from the file
    position, exclusively per open file (a second handle, as another process's, is refused even in one process),
    LK_NBLCK failing at once with PermissionError (EACCES), LK_UNLCK releasing only what that handle holds.
    `held` maps (device, inode, byte) to the holding descriptor. `open` opens a file as Windows does with such locks:
    its read() of a byte another handle locked fails with PermissionError (EACCES)."""
    import builtins
    import errno
    import os
    import types

    module = types.ModuleType("msvcrt")
    module.LK_UNLCK, module.LK_LOCK, module.LK_NBLCK, module.LK_RLCK, module.LK_NBRLCK = range(5)
    module.held = {}

    def locking(fd, mode, nbytes):
        status, start = os.fstat(fd), os.lseek(fd, 0, os.SEEK_CUR)
        region = [(status.st_dev, status.st_ino, start + i) for i in range(nbytes)]
        if mode == module.LK_NBLCK and not any(byte in module.held for byte in region):
            module.held.update(dict.fromkeys(region, fd))
        elif mode == module.LK_UNLCK and all(module.held.get(byte) == fd for byte in region):
            for byte in region:
                del module.held[byte]
        else:
            raise PermissionError(errno.EACCES, "Permission denied")

    def open_with_locks(path, *args, **kwargs):
        handle = builtins.open(path, *args, **kwargs)
        read = handle.read

        def read_unless_locked(*read_args):  # from the position to the end of the file, at most
            fd = handle.fileno()
            status, start = os.fstat(fd), handle.tell()
            if any((device, inode) == (status.st_dev, status.st_ino) and start <= byte < status.st_size and holder != fd
                   for (device, inode, byte), holder in module.held.items()):
                raise PermissionError(errno.EACCES, "Permission denied")
            return read(*read_args)

        handle.read = read_unless_locked
        return handle

    module.locking, module.open = locking, open_with_locks
    return module


def test_windows_runs_lock_the_folder_with_msvcrt(tmp_path, monkeypatch):
    """Windows has no fcntl: the run lock is msvcrt's lock of one byte of the lock file (it did nothing there). That
    byte lies past the pid the file holds: another process cannot read a locked byte, and the refusal named "pid ?"
    when the first byte was locked."""
    import os

    from train.common import checkpointing

    msvcrt = fake_msvcrt()
    monkeypatch.setattr(checkpointing, "fcntl", None)
    monkeypatch.setitem(sys.modules, "msvcrt", msvcrt)
    monkeypatch.setattr(checkpointing, "open", msvcrt.open, raising=False)  # the lock file's reads see the locks
    out = tmp_path / "run"
    lock_file = out / checkpointing.LOCK_NAME
    with checkpointing.run_folder_lock(out):
        status = os.stat(lock_file)
        assert lock_file.read_text() == f"{os.getpid()}\n"
        [(device, inode, byte)] = msvcrt.held  # one byte of the file, past the pid
        assert (device, inode) == (status.st_dev, status.st_ino) and byte >= status.st_size
        monkeypatch.setattr(checkpointing, "_HELD_LOCKS", set())  # as another process, which does not hold it
        with pytest.raises(ValueError, match=rf"^Another process \(pid {os.getpid()}\) is training into .*run; wait"):
            with checkpointing.run_folder_lock(out):
                pass
    assert msvcrt.held == {}  # unlocked before the file was closed
    with checkpointing.run_folder_lock(out):  # free once the other run has ended
        assert len(msvcrt.held) == 1


def test_checkpoints_get_the_usual_permissions_and_killed_writers_temp_files_are_removed(env, tmp_path):
    import os
    import stat

    from train.common.checkpointing import atomic_torch_save

    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".kosmosg-{dead.pid}-abc.tmp"  # a half-written checkpoint of a killed run
    stale.write_bytes(b"x" * 1000)
    foreign = out / ".kosmosg-notapid-abc.tmp"
    foreign.write_bytes(b"y")
    previous = os.umask(0o022)
    try:
        path = atomic_torch_save({"step": 1}, out / "checkpoint.pt")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # was 0600: unreadable to another user
    assert not stale.exists() and foreign.exists()


def test_a_full_disk_while_checkpointing_is_one_error_naming_the_file(tmp_path, monkeypatch):
    """Found by a review: torch.save given a path reports a full disk as "RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos", a traceback naming nothing; written through a Python file it is the
    OSError, named, and the previous checkpoint stays."""
    import builtins
    import errno

    from train.common import checkpointing
    from train.common.config import input_error_message

    run = tmp_path / "run"
    checkpointing.save_checkpoint(run, model_state={"w": torch.zeros(4)}, step=1)
    before = (run / "checkpoint.pt").read_bytes()

    class FullDisk:  # a file on a disk with 100 bytes left
        def __init__(self, stream):
            self.stream, self.left = stream, 100

        def write(self, data):
            if len(data) > self.left:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.left -= len(data)
            return self.stream.write(data)

        def __getattr__(self, name):
            return getattr(self.stream, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda file, mode="r", *a, **k: FullDisk(real_open(file, mode, *a, **k))
                        if mode == "wb" and ".kosmosg-" in str(file) else real_open(file, mode, *a, **k))
    with pytest.raises(OSError) as err:
        checkpointing.save_checkpoint(run, model_state={"w": torch.ones(100_000)}, step=2)
    assert err.value.errno == errno.ENOSPC
    message = input_error_message(err.value)
    assert f"No space left on device (writing {run / 'checkpoint.pt'})" in message, message
    assert "is unchanged: free the space (or fix the folder) and run the same command again" in message
    monkeypatch.undo()
    assert (run / "checkpoint.pt").read_bytes() == before and [p.name for p in run.iterdir()] == ["checkpoint.pt"]


def test_a_checkpoint_whose_pickle_would_crash_torch_load_is_refused(tmp_path):
    """Found by a review: torch.load(weights_only=True) segfaults on a dict key nested 200k deep (an 800 KB file);
    the core's shape check runs first."""
    import zipfile

    from train.common.checkpointing import load_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    nested = b"\x80\x02}" + b")" + b"(Nt\x86" * 200_000 + b"Ns."
    with zipfile.ZipFile(run / "checkpoint.pt", "w") as zf:
        zf.writestr("archive/data.pkl", nested)
        zf.writestr("archive/byteorder", "little")
    with pytest.raises(ValueError, match=r"checkpoint\.pt is corrupt or not a train/ checkpoint \(CheckpointError: "
                                         r".*nests containers more than 200 deep"):
        load_checkpoint(run)


def test_fp16_loss_scale_resumes_and_an_overflowed_update_leaves_the_lr_schedule(tmp_path):
    """Found by a review: the fp16 loss scaler's state was not in checkpoint.pt (a resumed run started again from
    the initial scale), and an update the scaler skipped (overflowed gradients) still advanced the LR schedule,
    where fairseq leaves it. The scaler starts as the official runs set fairseq's (init scale 4, window 256).
    Checked with torch's CPU GradScaler: accelerate makes one only on a GPU."""
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    from train.common.checkpointing import restore, save_checkpoint
    from train.loop import LoopConfig, apply_update, build_accelerator

    cfg = LoopConfig(output_dir=str(tmp_path / "run"), mixed_precision="fp16", tensorboard=False, cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's state is per process: ours only
    try:
        handler = build_accelerator(cfg, find_unused_parameters=False).scaler_handler
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # the fp16 setting must not reach later tests
    assert (handler.init_scale, handler.growth_interval) == (4.0, 256)
    cfg.mixed_precision = "no"
    build_accelerator(cfg, find_unused_parameters=False)  # AcceleratedOptimizer needs a state
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / 10)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=256)
    accelerated = AcceleratedOptimizer(optimizer, scaler=scaler)
    scaler.scale((weight * float("inf")).sum()).backward()
    assert not apply_update(accelerated, scheduler)  # overflow: skipped, the schedule stays, the scale halves
    assert scheduler.last_epoch == 0 and torch.equal(weight.detach(), torch.ones(3)) and scaler.get_scale() == 2.0
    scaler.scale((weight * 2).sum()).backward()
    assert apply_update(accelerated, scheduler) and scheduler.last_epoch == 1
    save_checkpoint(tmp_path / "run", model_state={"w": weight.detach()}, step=2, grad_scaler=scaler)
    resumed = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=256)
    restore(load_checkpoint(tmp_path / "run"), grad_scaler=resumed)
    assert resumed.state_dict() == scaler.state_dict() and resumed.get_scale() == 2.0
