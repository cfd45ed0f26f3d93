"""The training loop every stage shares: accelerator, optimiser + LR schedule, deterministic data
stream, metrics, atomic checkpoints and exact resume.

A stage supplies a `Stage` (build the model wrapper, turn raw WebDataset records into items, collate
its share of a global batch); `run_training(stage, cfg)` does the rest.

Exactness and multi-process equivalence, by construction:
- data order is a pure function of (seed, epoch): shards in a seeded permutation, the records of a
  shard in a seeded shuffle; the position (epoch, shard cursor, record offset) is checkpointed;
- every per-sample random choice (caption drop, crop choice, CFG drop, noise, timestep) is drawn
  from a generator seeded by (seed, epoch, sample key) or (seed, step, sample key), never from a
  stream shared across samples, so it does not depend on how a batch is split over processes;
- the global torch RNG (dropout) is reseeded from (seed, step, rank) at every step;
- with `data_split: samples` every process reads the same record stream and takes its slice of
  each global batch (padding to the global batch's length), so N processes compute the same
  objective as one process with the same global batch. `data_split: shards` gives each process its
  own shards instead (less reading at scale, not equivalent to a 1-process run).

The objective contract: `Stage` modules return this process's *share* of the global objective (the
shares of all processes and all micro-batches of an update sum to it). DDP and FSDP average
gradients over processes, so the loop back-propagates `share * world_size`, which gives exactly the
gradient of the global objective.

Gradient accumulation: an update reads `batch_size * gradient_accumulation_steps` samples per process
and runs them as `gradient_accumulation_steps` equal micro-batches whose gradients add up, so
(batch_size 4, accumulation 2) makes the same update as (batch_size 8, accumulation 1); stages pad
and normalise over the whole update's items. Steps, checkpoints and the LR schedule count updates.

`distributed: fsdp` shards parameters, gradients and optimiser state over the processes (torch
FSDP2 `fully_shard`, one unit per `TransformerLayer`, on CPU with gloo as on GPU); checkpoints hold
the whole state either way (`train.common.checkpointing.gather_full_state`), so runs move freely
between 1 process, N DDP processes and N FSDP processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kosmosg_core.files import check_output_folder, write_text_atomic
from train.common.checkpointing import CHECKPOINT_NAME, TRAIN_CONFIG_NAME, check_model_keys, check_step_within, \
    gather_full_state, load_checkpoint, load_full_state, restore, run_folder_lock, save_checkpoint
from train.common.config import changed_keys, changed_settings, check_minimums, config_to_dict, exit_on_input_error, \
    flag_name, warn_if_warmup_outlasts_run
from train.common.metrics import METRICS_NAME, MetricsLog
from train.common.seeds import derive_seed
from train.model_init import load_tokenizer
from train.records import Record, RecordStream

logger = logging.getLogger(__name__)

# Set to N, every process of a run SIGKILLs itself right after update N is logged: a kill at an exact
# point, for tests of resume under load (an outside kill races a fast run).
SIGKILL_AT_STEP_ENV = "KOSMOSG_TRAIN_SIGKILL_AT_STEP"


@dataclass
class LoopConfig:
    """Fields every stage shares. Official values (spec section 8) are the defaults where one exists."""

    output_dir: str = field(default="runs/kosmosg", metadata={"help": "run folder: checkpoint.pt, metrics.jsonl, "
                                                                       "tensorboard logs"})
    data: str = field(default="", metadata={"help": "WebDataset shards: folder, glob or comma list (docs/data-format.md)"})
    tokenizer: str = field(default="", metadata={"help": "folder with sentencepiece.bpe.model + dict.txt"})
    model_config: str = field(default="official", metadata={
        "help": "KosmosGConfig: 'official', 'tiny' or a JSON file (ignored when --init-checkpoint carries a config)"})
    init_checkpoint: str = field(default="", metadata={
        "help": "start weights: a train/ run folder or its checkpoint.pt, a pack .safetensors or an official .pt"})
    init_vision: str = field(default="", metadata={
        "help": "an HF CLIPVisionModel/CLIPModel folder whose weights start the vision encoder (official stage 1 "
                "starts from CLIP ViT-L/14); overrides the vision weights of --init-checkpoint"})
    fresh_init: str = field(default="official", metadata={
        "help": "a model built from --model-config (no --init-checkpoint): official = torchscale's subLN scaling of "
                "the MLLM's fc1/fc2/out_proj/v_proj, random connector queries (randn) and fairseq's attention init in "
                "the connector, as the official model starts; unscaled = none of them (zero queries, PyTorch's "
                "init: what the shipped nano's stage 1 started from)"})
    seed: int = field(default=0, metadata={"help": "seeds model init, data order and every random choice"})
    batch_size: int = field(default=16, metadata={"min": 1, "help": "samples per process per micro-batch (official: 16/GPU "
                                                          "stage 3, 56/GPU stage 2)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"min": 1,
        "help": "micro-batches per optimiser update (their gradients add up): an update sees batch_size x this x "
                "processes samples"})
    max_steps: int = field(default=200000, metadata={"min": 1, "help": "optimiser updates (official: 300k stage 2, 200k stage 3)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak LR (official 1e-3)"})
    end_learning_rate: float = field(default=0.0, metadata={"min": 0, "help": "LR at max_steps (polynomial decay end)"})
    lr_power: float = field(default=1.0, metadata={"min": 0, "help": "polynomial decay power (1 = linear)"})
    warmup_steps: int = field(default=375, metadata={"min": 0, "help": "linear warm-up updates (official 375)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1"})
    adam_beta2: float = field(default=0.98, metadata={"help": "Adam beta2 (official 0.98)"})
    adam_eps: float = field(default=1e-6, metadata={"min": 0, "help": "Adam eps (official 1e-6)"})
    weight_decay: float = field(default=0.01, metadata={"min": 0, "help": "decoupled weight decay (fairseq Adam = AdamW)"})
    clip_norm: float = field(default=2.0, metadata={"min": 0, "help": "gradient clipping max norm, 0 = off (official 2.0)"})
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 | bf16 (accelerate autocast)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    save_every: int = field(default=2000, metadata={"min": 1, "help": "write checkpoint.pt every N steps (and at the end)"})
    log_every: int = field(default=1, metadata={"min": 1, "help": "write metrics every N steps"})
    resume: str = field(default="auto", metadata={
        "help": "auto: continue from OUTPUT_DIR/checkpoint.pt if present; never: refuse an existing one; "
                "or a checkpoint path"})
    data_split: str = field(default="samples", metadata={
        "help": "samples: every process reads the stream and takes its slice (N processes == 1 process); "
                "shards: each process reads its own shards"})
    tensorboard: bool = field(default=True, metadata={"help": "also log to tensorboard (OUTPUT_DIR/<stage>, e.g. OUTPUT_DIR/stage1)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    cpu: bool = field(default=False, metadata={"help": "force CPU even when a GPU is present"})
    distributed: str = field(default="ddp", metadata={
        "help": "ddp: every process holds the whole model; fsdp: parameters, gradients and optimiser state sharded "
                "over the processes (FSDP2, one unit per transformer layer). Checkpoints are whole either way"})


@dataclass
class MLLMTrainingConfig(LoopConfig):
    """The settings of the stages that train the MLLM on interleaved prompts (1 and 3)."""

    dropout: float = field(default=0.1, metadata={"min": 0, "max": 1,
                                                  "help": "MLLM embedding and residual dropout (official 0.1)"})
    attention_dropout: float = field(default=0.0, metadata={
        "min": 0, "max": 1, "help": "MLLM attention dropout (official 0: 0.1 is configured, but its self-attention runs "
                                    "through xformers under --flash-attention, which applies none)"})
    activation_dropout: float = field(default=0.0, metadata={
        "min": 0, "max": 1, "help": "MLLM dropout after the FFN's GELU (official 0, torchscale's default)"})
    connector_attention_dropout: float = field(default=0.1, metadata={
        "min": 0, "max": 1, "help": "connector attention dropout (official 0.1: its attention has no xformers path)"})
    masked_entity_prob: float = field(default=0.5, metadata={"min": 0, "max": 1,
                                                             "help": "use the masked entity crop with this p"})

    def training_switches(self) -> dict:
        """The MLLM's and connector's training switches, for `replace_config(model_cfg, **...)`."""
        return {"decoder": {"dropout": self.dropout, "attention_dropout": self.attention_dropout,
                            "activation_dropout": self.activation_dropout,
                            "gradient_checkpointing": self.gradient_checkpointing},
                "connector": {"attention_dropout": self.connector_attention_dropout}}


# --- stage interface ---------------------------------------------------------------------------------
class Stage:
    """What a training stage provides to `run_training`."""

    name = "stage"
    resume_may_change: frozenset[str] = frozenset()  # the stage's own settings a resumed run may change
    earlier_version_note = ""  # what changed in this stage since checkpoints that lack the newer config fields
    # the flag that sets each model-config field a stage's training switches write (for the resume refusal)
    model_config_flags = {"decoder.dropout": "--dropout", "decoder.attention_dropout": "--attention-dropout",
                          "decoder.activation_dropout": "--activation-dropout",
                          "connector.attention_dropout": "--connector-attention-dropout"}

    @staticmethod
    def comparable_settings(settings: dict) -> dict:
        """A run's settings as a resume compares them: a stage whose setting is a set written as a list overrides
        it (stage 2's --kinds), so another order of the same items is the same run."""
        return settings

    def __init__(self, cfg):
        self.cfg = cfg
        # before the tokenizer loads: a bad setting is named first (run_training checks the loop's again)
        _check_loop_config(cfg)
        self.check_settings(cfg)
        self.tokenizer = load_tokenizer(cfg.tokenizer)  # every stage tokenizes prompts
        self._model_cfg = None  # set by `build`

    def check_settings(self, cfg) -> None:
        """Raise ValueError naming a stage-specific setting that cannot work (before anything loads)."""

    def build(self, cfg, accelerator) -> nn.Module:
        """-> the training module: `forward(batch) -> (objective share, metrics dict of shares)`, with
        `.model` the KosmosG whose state is checkpointed; only trainable parameters require grad, and
        all of them are in `.model` (frozen helpers live outside the module tree, see stage 2 / 3)."""
        raise NotImplementedError

    def select(self, record: Record) -> Any | None:
        """Cheap, deterministic: a record -> an item (or None to skip it). Runs on every process."""
        raise NotImplementedError

    def collate(self, mine: list, global_items: list, step: int, device) -> dict:
        """This process's items of one micro-batch (and all items of the update: every micro-batch,
        every process in samples mode; for global padding / denominators) -> this process's micro-batch
        (tensors on `device`)."""
        raise NotImplementedError

    def model_config(self):
        """The KosmosGConfig being trained (saved in checkpoints for export)."""
        return self._model_cfg

    def too_long(self, key: str, num_tokens: int) -> bool:
        """A prompt of `num_tokens` model inputs beyond the model's positions: its record is skipped (logged)."""
        limit = self._model_cfg.max_prompt_tokens
        if num_tokens > limit:
            logger.info("skipping %s: %d tokens > the model's %d", key, num_tokens, limit)
        return num_tokens > limit

    def tokenizer_dir(self) -> str:
        return self.cfg.tokenizer


def rank_slice(items: list, rank: int, world_size: int, split: str) -> list:
    """This process's part of the global batch (samples mode) or all of it (shards mode)."""
    if split == "shards":
        return items
    per = len(items) // world_size
    return items[rank * per:(rank + 1) * per]


def micro_batches(items: list, count: int) -> list[list]:
    """An update's items cut into `count` equal consecutive micro-batches."""
    per = len(items) // count
    return [items[i * per:(i + 1) * per] for i in range(count)]


def equal_shares(cfg: LoopConfig, accelerator) -> int:
    """How many equal micro-batches (over all processes) make one update: a stage whose objective
    is a mean over its micro-batch divides it by this to return its share."""
    return accelerator.num_processes * cfg.gradient_accumulation_steps


# --- optimiser -----------------------------------------------------------------------------------------
def polynomial_decay(step: int, warmup: int, total: int, peak: float, end: float, power: float) -> float:
    """fairseq's `polynomial_decay` formula for update `step` (0-based): linear warm-up then (1 - progress)^power.

    Update n (from 1) runs at the formula's value for n. fairseq's trainer runs it at the value for n - 1 (it
    sets the LR after each update, starting from step_update(0)): its first update runs at LR 0, ours at
    peak / warmup, and our last update runs at `end`. One update of the schedule apart."""
    update = step + 1
    if warmup > 0 and update <= warmup:
        return peak * update / warmup
    if update >= total:
        return end
    remaining = 1 - (update - warmup) / max(1, total - warmup)
    return (peak - end) * remaining ** power + end


def build_optimizer(parameters, cfg: LoopConfig):
    """fairseq's Adam with weight decay is decoupled (AdamW); applied to every trainable tensor, as there."""
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError("No trainable parameters: the stage froze everything.")
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    lr_at = lambda step: polynomial_decay(step, cfg.warmup_steps, cfg.max_steps, cfg.learning_rate,  # noqa: E731
                                          cfg.end_learning_rate, cfg.lr_power) / cfg.learning_rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    return params, optimizer, scheduler


# --- run folder --------------------------------------------------------------------------------------
def find_resume_checkpoint(cfg: LoopConfig) -> Path | None:
    existing = Path(cfg.output_dir) / CHECKPOINT_NAME
    if existing.is_dir():  # the checkpoint's name taken by a folder: a checkpoint could never be written there
        raise ValueError(f"{existing} is a folder; the run writes its checkpoint file there. Move the folder away or "
                         "use a new --output-dir.")
    if cfg.resume == "auto":
        return existing if existing.exists() else None
    if cfg.resume == "never":
        if existing.exists():
            raise ValueError(f"{cfg.output_dir} already holds a checkpoint and --resume never was given; use "
                             "--resume auto to continue it or a new --output-dir.")
        return None
    path = Path(cfg.resume)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise ValueError(f"--resume {cfg.resume}: no checkpoint there. Give a run folder with checkpoint.pt, "
                         "'auto' or 'never'.")
    if existing.exists() and existing.resolve() != path.resolve():
        raise ValueError(f"--output-dir {cfg.output_dir} holds its own checkpoint; continuing {path} there would "
                         "overwrite it and mix the two runs' metrics. Use a new --output-dir to branch from "
                         f"{cfg.resume}, or --resume auto to continue {cfg.output_dir}.")
    return path


# Settings a resumed run may change. The rest must equal the checkpoint's: they define the run (its data
# order, schedule, objective), and a silent change would make the resumed run neither the old one nor a new one.
RESUME_MAY_CHANGE = {
    "output_dir", "resume", "save_every", "log_every", "tensorboard", "progress", "cpu", "mixed_precision",
    "distributed", "gradient_checkpointing",  # how it runs, not what it computes
    "max_steps",  # extending (or ending) a run; the LR schedule then decays to the new end
    "batch_size", "gradient_accumulation_steps",  # compared as the global batch (processes may change)
    "data", "tokenizer", "model_config",  # files may move (the shard names, the model config and its keys are
    # checked); a stage adds its own paths (Stage.resume_may_change)
    "init_checkpoint", "init_vision",  # read at the start only: ignored on resume (a warning says so)
}


def input_fingerprints(cfg: LoopConfig, stage: Stage) -> dict[str, str]:
    """The content (`content_fingerprint`) of the files the run reads but does not train, by setting: the tokenizer
    and the stage's frozen models (`Stage.resume_may_change`: their paths may change on resume, their content not)."""
    from kosmosg_core.files import content_fingerprint

    fingerprints = {}
    for key in sorted({"tokenizer", *stage.resume_may_change}):
        value = getattr(cfg, key, None)
        fingerprint = content_fingerprint(value) if isinstance(value, str) and value else None
        if fingerprint is not None:
            fingerprints[key] = fingerprint
    return fingerprints


def _dropouts(model_cfg) -> list[str]:
    """"decoder.dropout 0.1"... for each dropout of the model in training that is on."""
    from kosmosg_core.config import DROPOUT_FIELDS

    values = {f"{part}.{name}": getattr(getattr(model_cfg, part), name) for part, name in DROPOUT_FIELDS}
    return [f"{name} {value:g}" for name, value in values.items() if value > 0]


def _check_resume_state(state: dict, stage: Stage, path: Path, cfg: LoopConfig, world: int,
                        fingerprints: dict[str, str]) -> None:
    from kosmosg_core.files import holds_content

    extra = state.get("extra", {})
    if extra.get("stage") != stage.name:
        raise ValueError(f"Checkpoint {path} was written by {extra.get('stage')!r}, not {stage.name!r}; resume it "
                         f"with `python -m train.{extra.get('stage')}` or use a new --output-dir.")
    check_step_within(state, cfg.max_steps, path)
    saved = extra.get("kosmosg_config")
    if saved is not None:
        saved_config, earlier = as_recorded_now(json.loads(saved))
        config_now = json.loads(stage.model_config().to_json(complete=True))
        may_change = {"decoder.gradient_checkpointing"}  # --gradient-checkpointing may change
        changed = changed_settings(saved_config, config_now, may_change)
        if changed:
            keys = changed_keys(saved_config, config_now, may_change)
            flags = sorted({stage.model_config_flags[key] for key in keys if key in stage.model_config_flags})
            how = [f"its {', '.join(flags)}"] if flags else []
            if any(key not in stage.model_config_flags for key in keys):  # sizes and the like: the model it began with
                how.append("the model it started from: its --init-checkpoint or --model-config")
            raise ValueError(f"Checkpoint {path} holds a model with a different KosmosGConfig than this run's "
                             f"({'; '.join(changed[:8])}); resume with the settings the run was started with "
                             f"({' and '.join(how)}), or use a new --output-dir.")
        if earlier and stage.earlier_version_note:
            logger.warning("resuming %s, written by an earlier version: %s", path, stage.earlier_version_note)
    if "train_config" not in extra:
        return
    before, now = (stage.comparable_settings(settings) for settings in (json.loads(extra["train_config"]),
                                                                        config_to_dict(cfg)))
    changed = changed_settings(before, now, RESUME_MAY_CHANGE | stage.resume_may_change, common_keys_only=True)
    saved_world = state.get("data", {}).get("world_size", 1)
    global_before = before["batch_size"] * before.get("gradient_accumulation_steps", 1) * saved_world
    global_now = cfg.batch_size * cfg.gradient_accumulation_steps * world
    if global_before != global_now:
        changed.append(f"global batch (batch_size x gradient_accumulation_steps x processes) {global_before} -> "
                       f"{global_now}")
    else:
        split_before = (before["batch_size"], before.get("gradient_accumulation_steps", 1), saved_world)
        split_now = (cfg.batch_size, cfg.gradient_accumulation_steps, world)
        dropouts = _dropouts(stage.model_config())
        if split_before != split_now and dropouts:
            logger.warning("resuming with the global batch split otherwise (batch_size x gradient_accumulation_steps "
                           "x processes %s -> %s): with dropout on (%s) its masks follow the split, so the run "
                           "goes on with other random draws than an unchanged resume (as valid, not the same weights)",
                           " x ".join(map(str, split_before)), " x ".join(map(str, split_now)), ", ".join(dropouts))
    saved_fingerprints = extra.get("input_fingerprints", {})  # checkpoints before them: paths only
    changed += [f"--{key.replace('_', '-')} {getattr(cfg, key)} holds other files (their contents differ from the "
                "run's)" for key in sorted(set(saved_fingerprints) & set(fingerprints))
                if saved_fingerprints[key] != fingerprints[key] and not holds_content(getattr(cfg, key),
                                                                                       saved_fingerprints[key])]
    if changed:
        raise ValueError(f"Checkpoint {path} was trained with other settings than this run's: {'; '.join(changed)}. "
                         "Resume with the run's settings (its train_config.json), or start a new --output-dir.")
    for key in ("init_checkpoint", "init_vision"):
        if before.get(key) != now.get(key):
            logger.warning("--%s is ignored when resuming: the run continues from %s", key.replace("_", "-"), path)
    if before.get("max_steps") != cfg.max_steps:
        logger.warning("max_steps %s -> %s: the LR schedule now decays to step %s", before.get("max_steps"),
                       cfg.max_steps, cfg.max_steps)


# --- the loop ------------------------------------------------------------------------------------------
def launched_processes() -> int:
    """How many processes the launcher started (torchrun and `accelerate launch` set WORLD_SIZE)."""
    if "WORLD_SIZE" not in os.environ and "MASTER_ADDR" in os.environ and \
            os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true":
        raise ValueError("`accelerate launch --cpu --num_processes N` starts a single process (accelerate leaves "
                         "multi-CPU runs to mpirun, which train/ does not use). For N CPU processes run `accelerate "
                         "launch --multi_gpu --num_processes N -m ...` on a machine without a GPU, or `torchrun "
                         "--nproc_per_node N -m ...`; for one process drop --num_processes (or unset MASTER_ADDR).")
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_as_script(main: Callable[[], Any]) -> None:
    """`python -m train.stageN` / torchrun / accelerate launch: run `main`, and end a launched worker with
    `os._exit(0)` once its work is done and flushed.

    Why: after a finished run (checkpoint written, process group destroyed, atexit handlers run), a
    torchrun worker with gloo + FSDP2 occasionally aborts in the interpreter's teardown ("terminate
    called without an active exception", SIGABRT, no Python frame; ~1 launch in 100 on a loaded
    2-core machine), which fails the whole launch although the training succeeded. `os._exit` skips
    that teardown (and atexit handlers: the trackers were finished by `accelerator.end_training`).
    A bad input ends the process with its one-line message (`exit_on_input_error`), Ctrl-C with one line saying
    how to go on (exit code 130, as a shell's); other failures raise.
    """
    try:
        exit_on_input_error(main)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): the updates after the last checkpoint are not kept; run the same command again "
              "to resume from it (--save-every sets how often one is written)", file=sys.stderr)
        sys.exit(130)
    if launched_processes() > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def build_accelerator(cfg: LoopConfig, find_unused_parameters: bool):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, GradScalerKwargs

    log_with = None
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            logger.warning("tensorboard is not installed; metrics go to %s only", METRICS_NAME)
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        # `accelerate launch --use_fsdp` (or an accelerate config with FSDP) asks for sharding: train/
        # shards with its own FSDP2 units (one per TransformerLayer, `shard_with_fsdp`), which also run
        # on CPU with gloo where accelerate's FSDP does not; accelerate itself then forms a plain group.
        logger.info("accelerate's FSDP switch is set: training with --distributed fsdp (accelerate's fsdp_* "
                    "wrapping options are not used)")
        cfg.distributed = "fsdp"
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    launched = launched_processes()
    # accelerate only forms a CPU process group (gloo) when told to use the CPU
    cpu = cfg.cpu or (launched > 1 and not torch.cuda.is_available())
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters),
                # fp16's loss scaler as the official runs set fairseq's: --fp16-init-scale 4, --fp16-scale-window 256
                GradScalerKwargs(init_scale=4.0, growth_interval=256)]
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu, log_with=log_with,
                              project_dir=cfg.output_dir, kwargs_handlers=handlers)
    if accelerator.num_processes != launched:
        raise ValueError(f"The launcher started {launched} processes but accelerate formed a group of "
                         f"{accelerator.num_processes}; the processes would train independently. Check the launch "
                         "command (e.g. torchrun --nproc_per_node N, or accelerate launch --num_processes N).")
    return accelerator


def shard_with_fsdp(module: nn.Module, device: torch.device, find_unused_parameters: bool) -> None:
    """FSDP2 in place over all processes: every TransformerLayer of `module.model` is one unit
    (gathered only for its own forward / backward), the rest of `module` (embeddings, vision tower,
    connector) the root unit. Frozen helpers outside the module tree stay whole on every process.

    Every process must run the same unit forwards (stages decide optional forwards per update);
    parameters a process did not use (e.g. the vision tower for a text-only micro-batch) reduce
    zeros when `find_unused_parameters`, as under DDP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from kosmosg_core.layers import TransformerLayer

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for layer in module.model.modules():
        if isinstance(layer, TransformerLayer):
            fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    module.set_reduce_scatter_unused_params(find_unused_parameters)


def resume_from_checkpoint(cfg: LoopConfig, stage: Stage, model, optimizer, scheduler, stream: RecordStream,
                           rank: int, world: int, fingerprints: dict[str, str], grad_scaler=None) -> int:
    """Load the run's checkpoint (if resuming) into the live objects -> the update to continue from."""
    path = find_resume_checkpoint(cfg)
    if path is None:
        return 0
    state = load_checkpoint(path)
    # the stage and settings, named, before the tensors
    _check_resume_state(state, stage, path, cfg, world, fingerprints)
    check_model_keys(state, model.state_dict().keys(), path)
    try:
        load_full_state(model, optimizer, state["model"], state.get("optimizer"))
    except RuntimeError as e:  # shape mismatch from load_state_dict
        raise ValueError(f"Checkpoint {path} does not fit this model ({e}). Resume with the config the run was "
                         "started with, or use a new --output-dir.") from e
    start_step = restore(state, scheduler=scheduler, grad_scaler=grad_scaler)  # LR schedule, loss scale, RNG, step
    data_state = state["data"]
    if cfg.data_split == "shards":
        if data_state.get("world_size") != world:
            raise ValueError(f"Checkpoint {path} was written by {data_state.get('world_size')} processes with "
                             f"data_split=shards; resume with the same number of processes ({world} now).")
        stream.load_state_dict(data_state["ranks"][rank])
    else:
        stream.load_state_dict(data_state["ranks"][0])
    logger.info("resumed %s from %s at step %d", stage.name, path, start_step)
    return start_step


def apply_update(optimizer, scheduler) -> bool:
    """One optimiser update and the LR schedule's step -> whether the update was applied. Under fp16 the loss
    scaler skips an update whose gradients overflowed; fairseq then leaves its LR schedule where it was, and so
    does this (the scaler lowers its scale for the next try). Unlike fairseq's update count, the skipped step still
    counts toward max_steps (the loop's steps are the data's: a checkpoint resumes at the same sample)."""
    optimizer.step()
    applied = not getattr(optimizer, "step_was_skipped", False)
    if applied:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return applied


def as_recorded_now(saved: dict) -> tuple[dict, bool]:
    """A checkpoint's model config with the training switches an earlier version did not record, at the values it
    ran with: the FFN dropped its GELU output with p = dropout, the connector's attention had no dropout. -> (config,
    whether it was written by such a version)."""
    decoder, connector = saved.get("decoder", {}), saved.get("connector", {})
    earlier = "activation_dropout" not in decoder
    if earlier:
        decoder = {**decoder, "activation_dropout": decoder.get("dropout", 0.0)}
        connector = {"attention_dropout": 0.0, **connector}
    return {**saved, "decoder": decoder, "connector": connector}, earlier


def next_items(stage: Stage, stream: RecordStream, count: int) -> list:
    """The next `count` items the stage selects from the stream; a ValueError when a whole epoch of the data
    passes without one (every record skipped: the stream would otherwise repeat forever)."""
    items = []
    skipped, first_skipped_epoch = 0, None
    while len(items) < count:
        record = stream.next()
        try:
            item = stage.select(record)
        except (KeyError, ValueError) as e:  # a malformed sample: skipped with a warning, as train.data does
            reason = f"no field {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
            logger.warning("skipping sample %s of shard %s: %s (the layout is in docs/data-format.md)", record.key,
                           record.shard, reason)
            item = None
        if item is not None:
            items.append(item)
            skipped, first_skipped_epoch = 0, None
            continue
        skipped += 1
        first_skipped_epoch = record.epoch if first_skipped_epoch is None else first_skipped_epoch
        if record.epoch >= first_skipped_epoch + 2:  # a complete epoch in between, all of it skipped
            raise ValueError(f"{stage.name}: no sample in --data qualifies ({skipped} records in a row skipped, a "
                             f"whole pass over {len(stream.shards)} shard(s)); check that --data holds the samples this "
                             "stage reads (stage 2: the --kinds it names), and that prompts fit the model's "
                             "prompt-length limit (max_prompt_tokens; see the log above).")
    return items


def _check_loop_config(cfg: LoopConfig) -> None:
    """Settings refused before anything is loaded (torch's own checks of them come after the model is built and
    do not name the flag)."""
    check_minimums(cfg)  # again here: run_training may be called with a config not made by parse_config
    if cfg.fresh_init not in ("official", "unscaled"):
        raise ValueError(f"--fresh-init {cfg.fresh_init!r}: use official or unscaled.")
    if cfg.distributed not in ("ddp", "fsdp"):
        raise ValueError(f"distributed={cfg.distributed!r}: use 'ddp' or 'fsdp'.")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"--mixed-precision {cfg.mixed_precision!r}: use no, fp16 or bf16.")
    if not cfg.learning_rate > 0:  # the schedule is a factor of it: 0 divides by zero
        raise ValueError(f"--learning-rate {cfg.learning_rate}: must be above 0 (the peak LR; official 1e-3).")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise ValueError(f"{flag_name(name)} {getattr(cfg, name)}: must be from 0 to below 1 (official 0.9, 0.98).")


def run_training(stage: Stage, cfg: LoopConfig, find_unused_parameters: bool = True,
                 on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train `stage` for cfg.max_steps updates (resuming when a checkpoint exists). -> final metrics."""
    _check_loop_config(cfg)
    check_output_folder(cfg.output_dir, "--output-dir")
    main_process = int(os.environ.get("RANK", "0")) == 0  # of the whole job: it writes the run folder
    if main_process:  # one warning per run, not one per process
        warn_if_warmup_outlasts_run(cfg)
    with run_folder_lock(cfg.output_dir) if main_process else contextlib.nullcontext():
        return _train(stage, cfg, find_unused_parameters, on_step)


def _train(stage: Stage, cfg: LoopConfig, find_unused_parameters: bool, on_step) -> dict:
    accelerator = build_accelerator(cfg, find_unused_parameters)
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")

    stream = RecordStream(cfg.data, cfg.seed, rank, world, cfg.data_split)  # a bad --data fails before loading models
    torch.manual_seed(cfg.seed)  # model init: identical on every process
    module = stage.build(cfg, accelerator)
    model = module.model  # the KosmosG whose whole state is checkpointed
    sharded = cfg.distributed == "fsdp" and world > 1
    if cfg.distributed == "fsdp" and not sharded:
        logger.info("--distributed fsdp with one process: nothing to shard, the model stays whole")
    if sharded:  # before the optimiser: FSDP replaces the parameters with sharded ones
        shard_with_fsdp(module, accelerator.device, find_unused_parameters)
    params, optimizer, scheduler = build_optimizer(module.parameters(), cfg)
    fingerprints = input_fingerprints(cfg, stage)  # once: every checkpoint of the run holds them
    start_step = resume_from_checkpoint(cfg, stage, model, optimizer, scheduler, stream, rank, world, fingerprints,
                                        accelerator.scaler)
    if accelerator.is_main_process:
        metrics_log = MetricsLog(out, start_step)
        write_text_atomic(out / TRAIN_CONFIG_NAME, json.dumps({"stage": stage.name, **config_to_dict(cfg)}, indent=1))

    if sharded:  # accelerate would wrap the (already sharded) module in DDP
        optimizer = accelerator.prepare(optimizer)
    else:
        module, optimizer = accelerator.prepare(module, optimizer)
    if accelerator.trackers == [] and cfg.tensorboard and accelerator.log_with:
        # a resumed run drops the events a killed run logged after its checkpoint (metrics.jsonl does the same)
        purge = {"tensorboard": {"purge_step": start_step + 1}} if start_step else {}
        accelerator.init_trackers(stage.name, init_kwargs=purge)

    progress = None
    if cfg.progress and accelerator.is_local_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.max_steps, initial=start_step, desc=stage.name, dynamic_ncols=True)
    metrics: dict = {}
    accumulation = cfg.gradient_accumulation_steps
    update_items = cfg.batch_size * accumulation * (world if cfg.data_split == "samples" else 1)
    for step in range(start_step, cfg.max_steps):
        started = time.perf_counter()
        torch.manual_seed(derive_seed(cfg.seed, "step", step, rank))  # dropout: independent of history
        items = next_items(stage, stream, update_items)

        module.train()
        lr = scheduler.get_last_lr()[0]  # the LR this update uses
        shares = []  # per micro-batch: [objective share, *metric shares]
        for micro, micro_items in enumerate(micro_batches(items, accumulation)):
            batch = stage.collate(rank_slice(micro_items, rank, world, cfg.data_split), items, step, accelerator.device)
            last = micro == accumulation - 1
            # DDP: gradients are averaged over processes once, in the last micro-batch's backward
            with contextlib.nullcontext() if last else accelerator.no_sync(module):
                with accelerator.autocast():
                    share, parts = module(batch)
                accelerator.backward(share * world)  # processes average: world * share gives the global gradient
            shares.append(torch.stack([share.detach().float()] + [v.detach().float() for v in parts.values()]))
        grad_norm = accelerator.clip_grad_norm_(params, cfg.clip_norm) if cfg.clip_norm > 0 else None
        apply_update(optimizer, scheduler)

        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            values = accelerator.reduce(torch.stack(shares).sum(0), reduction="sum")
            metrics = {"step": step + 1, "loss": values[0].item()}
            metrics.update({name: values[i + 1].item() for i, name in enumerate(parts)})
            metrics["lr"] = lr
            if grad_norm is not None:
                metrics["grad_norm"] = float(full_tensor(grad_norm))
            metrics["world_size"] = world
            metrics["step_seconds"] = round(time.perf_counter() - started, 4)
            if accelerator.is_main_process:
                metrics_log.write(metrics)
                if accelerator.log_with:
                    accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=step + 1)
            if on_step is not None:
                on_step(step + 1, metrics)
        if str(step + 1) == os.environ.get(SIGKILL_AT_STEP_ENV):  # fault injection (tests): die as a killed run
            os.kill(os.getpid(), signal.SIGKILL)
        if progress is not None:
            progress.update(1)
            if metrics:
                progress.set_postfix(loss=f"{metrics['loss']:.4g}", lr=f"{metrics['lr']:.3g}")

        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
            save_run_checkpoint(accelerator, stage, model, optimizer.optimizer, scheduler, stream, step + 1, cfg,
                                fingerprints)
    if progress is not None:
        progress.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly FSDP-sharded one (DTensor)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def save_run_checkpoint(accelerator, stage: Stage, model, optimizer, scheduler, stream: RecordStream, step: int,
                        cfg: LoopConfig, fingerprints: dict[str, str] | None = None) -> None:
    """Every process calls it: whole model + optimiser state (FSDP shards gathered) -> checkpoint.pt, with the frozen
    inputs' `fingerprints` (`input_fingerprints`)."""
    from accelerate.utils import gather_object

    positions = gather_object([stream.state_dict()])  # every process's data position, in rank order
    model_state, optimizer_state = gather_full_state(model, optimizer)
    if accelerator.is_main_process:
        extra = {"stage": stage.name, "kosmosg_config": stage.model_config().to_json(complete=True),
                 "tokenizer": stage.tokenizer_dir(), "train_config": json.dumps(config_to_dict(cfg)),
                 "input_fingerprints": fingerprints or {}}
        data_state = {"world_size": accelerator.num_processes, "split": cfg.data_split, "ranks": positions}
        save_checkpoint(cfg.output_dir, model_state=model_state, optimizer_state=optimizer_state, scheduler=scheduler,
                        step=step, data_state=data_state, extra=extra, grad_scaler=accelerator.scaler)
        logger.info("step %d: wrote %s", step, Path(cfg.output_dir) / CHECKPOINT_NAME)
    accelerator.wait_for_everyone()
