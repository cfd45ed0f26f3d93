"""Atomic, exactly-resumable training checkpoints.

A checkpoint is one file `<run_dir>/checkpoint.pt` holding model, optimiser, LR scheduler, RNG
states, step and data position. It is written to a temporary file in the same folder, flushed,
fsynced and renamed over the old one, so a kill at any moment leaves either the old or the new
checkpoint, never a half-written file. It is read back with `torch.load(weights_only=True)`.

The model and optimiser state in the file are always whole, whatever wrote them: a sharded (FSDP)
run gathers them with `gather_full_state` and loads them back with `load_full_state`, so a run
saved by N processes resumes under any number of processes, sharded or not, and exports as usual.
The optimiser state is keyed by parameter index, exactly as a 1-process `optimizer.state_dict()`.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # Windows: run_folder_lock uses msvcrt's byte-range locks instead
    fcntl = None

CHECKPOINT_NAME = "checkpoint.pt"
TRAIN_CONFIG_NAME = "train_config.json"  # the run's settings, beside its checkpoint


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    # numpy's key array is stored as a tensor so the file stays loadable with weights_only=True
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj, path) -> Path:
    from kosmosg_core.files import atomic_output

    # through a Python file, so that a failed write (a full disk) is an OSError, which atomic_output names the path
    # in: torch's zip writer reports it as "RuntimeError: [enforce fail at inline_container.cc] unexpected pos"
    # (with a path, nothing else; with a file, the file's OSError is that error's context)
    with atomic_output(path) as tmp, open(tmp, "wb") as stream:
        try:
            torch.save(obj, stream)
        except RuntimeError as e:
            cause = e.__context__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None:
                raise
            raise cause from None  # the write's own error (its errno and kind); torch's wrapper adds nothing
    return Path(path)


def save_checkpoint(run_dir, *, model_state: dict, optimizer=None, scheduler=None, step: int,
                    data_state: dict | None = None, extra: dict | None = None,
                    optimizer_state: dict | None = None, grad_scaler=None) -> Path:
    """Write the run's state; `optimizer_state` (e.g. from `gather_full_state`) replaces `optimizer.state_dict()`;
    `grad_scaler`: fp16's loss scaler, whose scale and growth count a resume must continue from."""
    state = {"model": model_state, "step": step, "rng": rng_state(), "data": data_state or {},
             "extra": extra or {}}
    if optimizer_state is None and optimizer is not None:
        optimizer_state = optimizer.state_dict()
    if optimizer_state is not None:
        state["optimizer"] = optimizer_state
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if grad_scaler is not None:
        state["grad_scaler"] = grad_scaler.state_dict()  # plain numbers: loads with weights_only
    try:
        return atomic_torch_save(state, Path(run_dir) / CHECKPOINT_NAME)
    except OSError as e:  # e.g. a full disk: what a resume would start from is intact
        message = (f"{e.strerror or e}; the checkpoint there before, if any, is unchanged: free the space (or fix the "
                   "folder) and run the same command again to resume from it")
        raise (OSError(e.errno, message) if e.errno else OSError(message)) from e


def load_checkpoint(run_dir_or_file, expected_model_keys=None) -> dict | None:
    """-> the saved state, or None when no checkpoint exists yet. Refuses corrupt or mismatched files."""
    path = Path(run_dir_or_file)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        return None
    if not path.is_file():  # a FIFO or device: reading it would block or never end
        raise ValueError(f"{path} is not a regular file; give a train/ run folder or its checkpoint.pt.")
    model = " (a .safetensors file is a model, not a training checkpoint: a run starts from one with " \
        "--init-checkpoint)" if path.suffix.lower() == ".safetensors" else ""
    from kosmosg_core.safe_unpickle import check_pickle_shape

    try:
        check_pickle_shape(path)  # torch.load's own unpickler segfaults on a dict key nested deep
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged zip/pickle
        # torch's own advice (load with weights_only=False) is unsafe for untrusted files: keep only the reason
        reason = next((line.strip() for line in str(e).splitlines() if line.strip() and not any(
            boilerplate in line for boilerplate in ("weights_only", "Please file an issue", "Check the documentation"))),
            "unreadable")
        raise ValueError(f"{path} is corrupt or not a train/ checkpoint ({type(e).__name__}: {reason}). Give a train/ "
                         f"run folder or its {CHECKPOINT_NAME}{model}; a damaged {CHECKPOINT_NAME} can be deleted to "
                         "start that run over.") from e
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise ValueError(f"{path} is not a train/ checkpoint (no model/step){model}. Use --output-dir of a train/ run.")
    if expected_model_keys is not None:
        check_model_keys(state, expected_model_keys, path)
    return state


def check_model_keys(state: dict, expected_model_keys, path) -> None:
    missing = sorted(set(expected_model_keys) - set(state["model"]))
    unexpected = sorted(set(state["model"]) - set(expected_model_keys))
    if missing or unexpected:
        raise ValueError(f"Checkpoint {path} does not match this model/config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}. Resume with the config the run was started with, "
                         "or use a new --output-dir.")


LOCK_NAME = ".run.lock"
_HELD_LOCKS: set[str] = set()  # run folders this process holds


@contextlib.contextmanager
def run_folder_lock(output_dir):
    """While it is held, no other process can train into `output_dir` (e.g. a relaunch while the workers of a
    killed launcher still train: their checkpoints and metrics would interleave): an exclusive lock on
    OUTPUT_DIR/.run.lock (`_try_lock`), refused by name. Nested use in one process is a no-op."""
    folder = Path(output_dir).resolve()
    if str(folder) in _HELD_LOCKS:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a+") as handle:
        if not _try_lock(handle):
            raise ValueError(f"Another process (pid {_lock_holder(handle)}) is training into {folder}; wait for it or "
                             "stop it (the workers of a killed torchrun can outlive their launcher: check `ps`), or use "
                             "another --output-dir.")
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _HELD_LOCKS.add(str(folder))
        try:
            yield
        finally:
            _HELD_LOCKS.discard(str(folder))
            _unlock(handle)


# Windows (no fcntl): msvcrt locks byte ranges, and no other process can read a locked byte, so the byte that stands
# for the file lies past the pid written at its start (locking past the end of a file is allowed there)
_MSVCRT_LOCK_BYTE = 1 << 20


def _try_lock(handle) -> bool:
    """A non-blocking exclusive lock on the open lock file -> False when another process holds it.
    POSIX: flock on the whole file. Windows: msvcrt's lock of byte _MSVCRT_LOCK_BYTE."""
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    import msvcrt

    os.lseek(handle.fileno(), _MSVCRT_LOCK_BYTE, os.SEEK_SET)  # msvcrt locks from the file descriptor's position
    try:
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:  # PermissionError (EACCES): another process holds it
        return False
    return True


def _unlock(handle) -> None:
    """Closing the file releases an flock; Windows wants a byte-range lock released before its file is closed
    (it frees a closed file's locks only eventually)."""
    if fcntl is None:
        import msvcrt

        os.lseek(handle.fileno(), _MSVCRT_LOCK_BYTE, os.SEEK_SET)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)


def _lock_holder(handle) -> str:
    """The pid the holding process wrote into the lock file, or "?" (it is writing it, or the file is unreadable)."""
    try:
        handle.seek(0)
        return handle.read().strip() or "?"
    except OSError:
        return "?"


def check_step_within(state: dict, max_steps: int, path) -> None:
    """A run resumed with --max-steps below its checkpoint's step would train nothing and rewrite its outputs and
    record under the wrong step: refused."""
    if int(state["step"]) > max_steps:
        raise ValueError(f"Checkpoint {path} is at step {int(state['step'])}, beyond --max-steps {max_steps}; give "
                         f"--max-steps {int(state['step'])} or more to continue it, or a new --output-dir.")


def restore(state: dict, model=None, optimizer=None, scheduler=None, grad_scaler=None) -> int:
    """Load a saved state into the live objects (RNG included) -> the step to continue from."""
    if grad_scaler is not None and "grad_scaler" in state:
        grad_scaler.load_state_dict(state["grad_scaler"])
    if model is not None:
        model.load_state_dict(state["model"])
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
        # the saved state carries the LR the old schedule set for the next update; the schedule may have
        # changed (--max-steps on resume): the next update's LR comes from the current one (LambdaLR)
        for group, base_lr, at in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * at(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    set_rng_state(state["rng"])
    return int(state["step"])


# --- whole state of a possibly sharded model -------------------------------------------------------------
def _optimized_names(model, optimizer) -> list[str]:
    """The name in `model` of every parameter `optimizer` updates, in the optimiser's order (its indices)."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    order = [names.get(id(p)) for group in optimizer.param_groups for p in group["params"]]
    if None in order:
        raise ValueError("The optimiser updates a parameter outside the checkpointed model; build it from "
                         "the model's parameters only.")
    return order


def _rekey(optimizer_state: dict, key: dict) -> dict:
    """Optimiser state with every parameter reference mapped through `key` (index <-> name)."""
    return {"state": {key[k]: v for k, v in optimizer_state["state"].items()},
            "param_groups": [{**group, "params": [key[p] for p in group["params"]]}
                             for group in optimizer_state["param_groups"]]}


def gather_full_state(model, optimizer) -> tuple[dict, dict]:
    """-> (model state, optimiser state), whole and on the CPU, plain or FSDP-sharded `model` alike.

    Collective under torch.distributed: every process calls it; process 0 gets the state, the others
    empty dicts. The optimiser state is keyed by index, as a 1-process `optimizer.state_dict()`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))
    if not optimizer_state:
        return model_state, optimizer_state
    index = {name: i for i, name in enumerate(_optimized_names(model, optimizer))}
    return model_state, _rekey(optimizer_state, index)


def load_full_state(model, optimizer, model_state: dict, optimizer_state: dict | None) -> None:
    """Load a whole saved state (`gather_full_state`'s or a 1-process one) into a plain or sharded
    `model` and its optimiser; every process calls it with the same state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    options = StateDictOptions(full_state_dict=True)
    if optimizer_state is None:
        set_model_state_dict(model, model_state, options=options)
        return
    names = dict(enumerate(_optimized_names(model, optimizer)))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=_rekey(optimizer_state, names),
                   options=options)
