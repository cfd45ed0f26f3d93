"""Export a train/ checkpoint to the pack's `.safetensors` (the format the ComfyUI loader and the CLI read).

    python -m train.export --checkpoint runs/stage3 --tokenizer data/tokenizer --out models/kosmosg/mine.safetensors \\
        --dtype float16

Only the inference tensors are written (the stage-2 reconstruction branch and training switches
such as dropout and gradient checkpointing are dropped); the tokenizer files go inside the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from train.common.config import exit_on_input_error, parse_config

logger = logging.getLogger(__name__)



@dataclass
class ExportConfig:
    checkpoint: str = field(default="", metadata={"help": "train/ run folder or its checkpoint.pt"})
    out: str = field(default="", metadata={"help": "output .safetensors path"})
    tokenizer: str = field(default="", metadata={
        "help": "folder with sentencepiece.bpe.model + dict.txt (default: the one the run was trained with)"})
    dtype: str = field(default="float32", metadata={"help": "float32 | float16 | bfloat16"})
    overwrite: bool = field(default=False, metadata={"help": "replace --out if it exists (default: refuse)"})


def export(cfg: ExportConfig) -> Path:
    from kosmosg_core.checkpoint import save_pack_checkpoint, state_dict_mismatch
    from kosmosg_core.config import DTYPE_NAMES, KosmosGConfig
    from kosmosg_core.model import KosmosG
    from kosmosg_core.files import check_output_file
    from kosmosg_core.devices import resolve_dtype
    from train.common.checkpointing import load_checkpoint
    from train.model_init import load_tokenizer

    if not cfg.checkpoint or not cfg.out:
        raise ValueError("--checkpoint (a train/ run folder or checkpoint.pt) and --out (.safetensors) are required.")
    if cfg.dtype not in DTYPE_NAMES:
        raise ValueError(f"--dtype {cfg.dtype!r}: use one of {', '.join(DTYPE_NAMES)}.")
    check_output_file(cfg.out, "--out", suffix=".safetensors", suffix_why="the pack format is .safetensors",
                      replace_fix=None if cfg.overwrite else "add --overwrite true")  # before the checkpoint is read
    state = load_checkpoint(cfg.checkpoint)
    if state is None:
        raise ValueError(f"--checkpoint {cfg.checkpoint}: no checkpoint.pt there (has the run saved one yet?).")
    extra = state.get("extra", {})
    if "kosmosg_config" not in extra:
        raise ValueError(f"--checkpoint {cfg.checkpoint} carries no model config; it was not written by train/.")
    model_cfg = KosmosGConfig.from_json(extra["kosmosg_config"]).for_inference()
    if extra.get("stage") == "stage1":
        logger.warning("%s is a stage-1 checkpoint: its AlignerNet is untrained (stage 2 trains it), so the exported "
                       "conditioning will not steer SD1.5; export a stage-2 or stage-3 run for use", cfg.checkpoint)
    tokenizer = load_tokenizer(cfg.tokenizer or extra.get("tokenizer", ""))
    tokenizer.check_matches(model_cfg.decoder.vocab_size)

    model = KosmosG(model_cfg)
    expected = model.state_dict()
    # training-only tensors (the stage-2 reconstruction branch) are left out of the pack
    inference_tensors = {k: v for k, v in state["model"].items() if k in expected}
    mismatch = state_dict_mismatch(expected, inference_tensors)
    if mismatch:
        raise ValueError(f"--checkpoint {cfg.checkpoint} does not hold a complete Kosmos-G of its config ({mismatch}); "
                         "export a checkpoint.pt written by train/.")
    model.load_state_dict(inference_tensors, strict=True)
    path = save_pack_checkpoint(model.eval(), tokenizer, cfg.out, dtype=resolve_dtype(cfg.dtype),
                                extra_metadata={"source": "train.export", "stage": extra.get("stage", ""),
                                                "step": state["step"]})
    logger.info("exported %s (step %d, %s) -> %s", cfg.checkpoint, state["step"], cfg.dtype, path)
    return path


def main(argv=None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return export(parse_config(ExportConfig, argv, description=__doc__))


if __name__ == "__main__":
    exit_on_input_error(main)
