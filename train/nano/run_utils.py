"""What the three nano training commands share: run folder, exact resume, metrics, progress.

Exact resume by construction: every random choice of step ``s`` (batch indices, noise, timesteps,
caption drops) is drawn from a generator seeded by ``(seed, s)`` (:func:`step_generator`), so a run
resumed from the checkpoint of step ``s`` draws what the uninterrupted run drew. The checkpoint
(``train.common.checkpointing``) holds model, optimiser, EMA and step; metrics lines written after
the last checkpoint by a killed run are dropped on resume.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from kosmosg_core.files import write_text_atomic
from train.common.checkpointing import TRAIN_CONFIG_NAME, check_step_within, load_checkpoint, restore, run_folder_lock
from train.common.config import changed_settings, config_to_dict, warn_if_warmup_outlasts_run
from train.common.metrics import MetricsLog

logger = logging.getLogger(__name__)


def warmup_cosine(warmup_steps: int, max_steps: int, constant: bool = False):
    """The nano runs' LR factor of step s (for LambdaLR): linear warm-up to 1, then cosine decay to a tenth at
    max_steps (or 1 throughout with `constant`)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if constant:
            return 1.0
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def setup_threads(num_threads: int) -> None:
    """Fix the torch thread count (exact resume requires the same count; the CI machine has 2 cores)."""
    torch.set_num_threads(max(1, int(num_threads)))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator for every random draw of optimiser step ``step`` (independent of resume)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))


# Settings a resumed nano run may change; the others define the run (data, schedule, objective) and must
# equal the checkpoint's. The text encoder's path may move: its weights are fingerprinted in the U-Net's cache.
RESUME_MAY_CHANGE = {"output_dir", "max_steps", "save_every", "eval_every", "eval_every_minutes", "eval_samples",
                     "eval_steps", "eval_guidance", "eval_method", "eval_scenes", "num_threads", "text_encoder",
                     "init_vae"}


def check_resumed_settings(saved: dict, current: dict, path: Path) -> None:
    changed = changed_settings(saved, current, RESUME_MAY_CHANGE, common_keys_only=True)
    if changed:
        raise ValueError(f"Checkpoint in {path} was trained with other settings than this run's: {'; '.join(changed)}. "
                         f"Resume with the run's settings ({TRAIN_CONFIG_NAME}), or pass a new --output-dir.")


def load_run_checkpoint(output_dir: Path, model: torch.nn.Module, config) -> dict | None:
    """The run's checkpoint (validated against ``model`` and the run's settings, its architecture's included),
    or None."""
    state = load_checkpoint(output_dir, expected_model_keys=list(model.state_dict()))
    if state is None:
        return None
    check_step_within(state, config.max_steps, output_dir)
    saved = state.get("extra", {}).get("config", {})
    check_resumed_settings(saved, config_to_dict(config), output_dir)
    current = model.state_dict()
    for name, tensor in state["model"].items():
        if tuple(tensor.shape) != tuple(current[name].shape):
            raise ValueError(
                f"Checkpoint in {output_dir} does not match this model: {name} has shape {list(tensor.shape)}, "
                f"the model expects {list(current[name].shape)}. Resume with the run's config or a new --output-dir."
            )
    return state


def load_state_file(module: torch.nn.Module, path: Path, what: str, made_by: str) -> None:
    """`path`'s tensors into `module`, or a short ValueError naming the file, what it should be and its maker
    (not torch's list of every missing key)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable .safetensors file ({e}); give {what} written by {made_by}.") from e
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong_shape = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(f"{path} is not {what} written by {made_by}: {len(missing)} tensors missing (e.g. "
                         f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(wrong_shape)} "
                         f"of another shape (e.g. {sorted(wrong_shape)[:2]}).")
    module.load_state_dict(state)


def write_config(output_dir: Path, config) -> None:
    write_text_atomic(output_dir / TRAIN_CONFIG_NAME, json.dumps(config_to_dict(config), indent=2))


def with_run_lock(train):
    """`train(cfg)` holding its run folder's lock (`run_folder_lock`) while it runs: a second process training
    into the same --output-dir is refused."""
    def locked(cfg):
        with run_folder_lock(cfg.output_dir):
            return train(cfg)
    return locked


def open_run(output_dir: Path, module: torch.nn.Module, optimizer, scheduler, config) -> tuple[int, MetricsLog]:
    """Start or resume a run in `output_dir`: the checkpoint (if any, validated) restores `module`, optimiser
    and scheduler; the config is recorded; metrics lines past the checkpoint are dropped.
    -> (first step to run, the run's metrics log)."""
    warn_if_warmup_outlasts_run(config)
    state = load_run_checkpoint(output_dir, module, config)
    start = 0 if state is None else restore(state, module, optimizer, scheduler)
    write_config(output_dir, config)
    if start:
        logger.info("resuming %s from step %d", output_dir, start)
    return start, MetricsLog(output_dir, start)


def progress(total: int, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=2.0)


@torch.no_grad()
def ema_update_into(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (same architecture)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)
