"""Building the Kosmos-G model a stage trains: its config, its initial weights (a checkpoint or the official fresh
init), the tokenizer, which parts train, and the dtype of the frozen helpers."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from train.common.checkpointing import CHECKPOINT_NAME, TRAIN_CONFIG_NAME, load_checkpoint

if TYPE_CHECKING:
    from train.loop import LoopConfig

logger = logging.getLogger(__name__)


def resolve_model_config(spec: str, vocab_size: int | None = None):
    """--model-config: 'official', 'tiny' or a KosmosGConfig JSON file (fields left out take the defaults).
    With `vocab_size` (the tokenizer's), 'tiny' and a JSON without decoder.vocab_size take it."""
    from kosmosg_core.config import KosmosGConfig

    if spec == "official":
        return KosmosGConfig.official()
    if spec == "tiny":
        return KosmosGConfig.tiny() if vocab_size is None else KosmosGConfig.tiny(vocab_size=vocab_size)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--model-config {spec!r}: use 'official', 'tiny' or a KosmosGConfig JSON file.")
    try:
        data = json.loads(path.read_text())
        if vocab_size is not None and isinstance(data, dict) and isinstance(data.get("decoder", {}), dict) \
                and "vocab_size" not in data.get("decoder", {}):
            data = {**data, "decoder": {**data.get("decoder", {}), "vocab_size": vocab_size}}
        return KosmosGConfig.from_dict(data)
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"--model-config {path} is not a valid KosmosGConfig JSON ({e}).") from e


def is_train_checkpoint(path: Path) -> bool:
    """A train/ run folder or a checkpoint.pt inside one (recognised by the run's train_config.json)."""
    if path.is_dir():  # one that has not saved yet, too: it gets "no checkpoint.pt in that run folder yet"
        return (path / TRAIN_CONFIG_NAME).exists() or (path / CHECKPOINT_NAME).exists()
    return path.name == CHECKPOINT_NAME and (path.parent / TRAIN_CONFIG_NAME).exists()  # not a file exported there


def init_checkpoint_stage(path_text: str) -> str | None:
    """The stage that wrote --init-checkpoint ("stage1", ...) when it is a train/ run, else None."""
    path = Path(path_text) if path_text else None
    if path is None or not path.exists() or not is_train_checkpoint(path):
        return None
    config_file = (path if path.is_dir() else path.parent) / TRAIN_CONFIG_NAME
    try:
        return json.loads(config_file.read_text()).get("stage")
    except (OSError, ValueError):
        return None


def read_init_weights(path_text: str, model_config_spec: str):
    """-> (KosmosGConfig, state dict with KosmosG names) from a train/ checkpoint, pack or official file.

    Official .pt files carry no config: their sizes are read from the tensors, or from --model-config
    when it names a JSON file (e.g. a stage-1 checkpoint that has no aligner yet)."""
    from kosmosg_core.checkpoint import file_format, read_checkpoint

    path = Path(path_text)
    if not path.exists():
        raise ValueError(f"--init-checkpoint {path} not found.")
    if is_train_checkpoint(path):
        state = load_checkpoint(path)
        if state is None:
            raise ValueError(f"--init-checkpoint {path}: no checkpoint.pt in that run folder yet.")
        from kosmosg_core.config import KosmosGConfig

        saved = state.get("extra", {}).get("kosmosg_config")
        if saved is None:
            raise ValueError(f"--init-checkpoint {path} has no model config; it was not written by train/.")
        return KosmosGConfig.from_json(saved), state["model"]
    is_json = model_config_spec.endswith(".json")
    if file_format(path) != "safetensors":  # an official .pt: sizes from --model-config's JSON, else the tensors
        cfg, state_dict, _ = read_checkpoint(path, resolve_model_config(model_config_spec) if is_json else None)
        return cfg, state_dict
    cfg, state_dict, _ = read_checkpoint(path)  # a pack file carries its config: the model it holds
    # a JSON without decoder.vocab_size follows the tokenizer: here the pack's
    given = resolve_model_config(model_config_spec, cfg.decoder.vocab_size) if is_json else None
    # the model's own fields (the training switches, e.g. dropout, come from this stage's flags)
    ours, theirs = (c.for_inference().to_dict(complete=True) for c in (cfg, given or cfg))
    if ours != theirs:
        from train.common.config import changed_settings

        logger.warning("--model-config %s is ignored: --init-checkpoint %s carries its own config, which differs "
                       "(%s)", model_config_spec, path, "; ".join(changed_settings(ours, theirs)[:4]))
    return cfg, state_dict


def load_weights(model: nn.Module, state_dict: dict, source: str, allow_missing: tuple[str, ...] = ()) -> None:
    """Load init weights: every tensor must fit; missing ones are allowed only under `allow_missing`
    prefixes (parts the previous stage did not have, e.g. the aligner's reconstruction branch)."""
    from kosmosg_core.checkpoint import state_dict_mismatch

    expected = model.state_dict()
    mismatch = state_dict_mismatch(expected, state_dict, allow_missing)
    if mismatch:
        raise ValueError(f"--init-checkpoint {source} does not match the model: {mismatch}. Check --model-config "
                         "against the checkpoint.")
    fresh = sorted(set(expected) - set(state_dict))
    if fresh:
        logger.info("init from %s: %d tensors not in the checkpoint keep their fresh init (%s ...)",
                    source, len(fresh), ", ".join(fresh[:3]))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()}, strict=False)


def load_tokenizer(tokenizer_dir: str):
    from kosmosg_core.tokenizer import KosmosGTokenizer

    if not tokenizer_dir:
        raise ValueError("--tokenizer is required: the folder with sentencepiece.bpe.model + dict.txt.")
    return KosmosGTokenizer.from_dir(tokenizer_dir)


def replace_config(cfg, **changes):
    """A deep copy of a KosmosGConfig with top-level part fields changed, e.g. decoder={"dropout": 0.1}."""
    from kosmosg_core.config import KosmosGConfig

    data = cfg.to_dict()
    for part, values in changes.items():
        data[part].update(values)
    return KosmosGConfig.from_dict(data)



def build_kosmosg(cfg: LoopConfig, tokenizer, adjust: Callable | None = None, allow_missing: tuple[str, ...] = (),
                  ignore: tuple[str, ...] = ()):
    """KosmosG from --init-checkpoint (its config) or --model-config (fresh, seeded init), with the
    training switches of this stage applied by `adjust(config) -> config`, then the vision encoder from
    --init-vision (a CLIP tower) when given. Checkpoint tensors under `ignore` prefixes are discarded;
    model tensors under `allow_missing` may be absent (fresh init)."""
    from kosmosg_core.model import KosmosG

    state = None
    if cfg.init_checkpoint:
        model_cfg, state = read_init_weights(cfg.init_checkpoint, cfg.model_config)
    else:
        model_cfg = resolve_model_config(cfg.model_config, tokenizer.vocab_size)
        if model_cfg.decoder.vocab_size != tokenizer.vocab_size:  # a fresh model: the config is what is wrong
            raise ValueError(f"--model-config {cfg.model_config} has decoder.vocab_size {model_cfg.decoder.vocab_size} "
                             f"but the tokenizer in {tokenizer.source} has {tokenizer.vocab_size} ids; set "
                             f"decoder.vocab_size to {tokenizer.vocab_size} or leave it out (it then follows the "
                             "tokenizer).")
    if adjust is not None:
        model_cfg = adjust(model_cfg)
    tokenizer.check_matches(model_cfg.decoder.vocab_size)
    model = KosmosG(model_cfg)
    if state is None:
        init_fresh_weights(model, official=cfg.fresh_init == "official")
    else:
        dropped = [k for k in state if k.startswith(ignore)] if ignore else []
        if dropped:
            logger.info("init: not loading %d checkpoint tensors (%s ...): this stage drops them or starts them fresh",
                        len(dropped), dropped[0])
        load_weights(model, {k: v for k, v in state.items() if k not in set(dropped)}, cfg.init_checkpoint,
                     allow_missing)
    if cfg.init_vision:
        from kosmosg_core.clip_vision import load_hf_clip_vision
        from kosmosg_core.errors import CheckpointNotFoundError

        if cfg.init_checkpoint:
            logger.info("--init-vision %s replaces the vision weights of --init-checkpoint", cfg.init_vision)
        try:
            load_hf_clip_vision(model.vision, cfg.init_vision)
        except CheckpointNotFoundError as e:
            raise CheckpointNotFoundError(f"--init-vision: {e}") from e
    return model


def init_fresh_weights(model, official: bool = True) -> None:
    """From-scratch init of the token embedding as fairseq's decoder does: N(0, D^-1/2), pad row 0 (the head is
    tied to it, so PyTorch's N(0, 1) default would start the LM with logits of std ~sqrt(D) and a cross-entropy far
    above log(V)). `official`: also torchscale's subLN init of the decoder (fc1, fc2, out_proj and v_proj weights and
    biases times sqrt(log(2 x layers))), the connector's random queries (official randn; zeros make its 64 outputs
    equal at the start) and its attention as fairseq's MultiheadAttention initialises itself (xavier q/k/v with gain
    2^-1/2, xavier out_proj, zero out_proj bias). The aligner initialises itself (`Aligner.init_like_torchscale`)."""
    from kosmosg_core.config import PAD_ID
    from kosmosg_core.layers import scale_subln_

    weight = model.decoder.embed_tokens.weight
    with torch.no_grad():
        weight.normal_(0.0, weight.shape[1] ** -0.5)
        weight[PAD_ID].zero_()
        if not official:
            return
        scale_subln_(model.decoder.layers, math.sqrt(math.log(2 * model.cfg.decoder.layers)))
        model.connector.latent_query.normal_()
        model.connector.x_attn.reset_xavier()


def set_trainable(model, decoder: bool, connector: bool, aligner: bool, vision_last: bool) -> None:
    """Freeze everything, then unfreeze the named groups (vision: last block(s) + ln_post only)."""
    model.requires_grad_(False)
    model.decoder.requires_grad_(decoder)
    model.connector.requires_grad_(connector)
    model.aligner.requires_grad_(aligner)
    if vision_last:
        names = set(model.vision.trainable_parameter_names())
        for name, parameter in model.vision.named_parameters():
            parameter.requires_grad_(name in names)


def frozen_dtype(cfg: LoopConfig) -> torch.dtype:
    """Frozen networks (score model, CLIP text encoder) run in the mixed-precision dtype (official fp16)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)


# --- the frozen CLIP text encoder (stage 2's target, stage 3's caption teacher) ------------------------
def load_clip_text(path_text: str):
    """(CLIPTokenizer, CLIPTextModel) from an SD1.5 folder or a single folder, local files only."""
    from transformers import CLIPTextModel, CLIPTokenizer

    if not path_text:
        raise ValueError("--clip-text-encoder is required: the SD1.5 model folder (text_encoder/ + tokenizer/) or a "
                         "folder with a CLIPTextModel and its CLIPTokenizer.")
    path = Path(path_text)
    if not path.is_dir():
        raise ValueError(f"--clip-text-encoder {path} is not a folder.")
    model_dir = path / "text_encoder" if (path / "text_encoder").is_dir() else path
    tokenizer_dir = path / "tokenizer" if (path / "tokenizer").is_dir() else path
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        model = CLIPTextModel.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"--clip-text-encoder {path}: cannot load a CLIP text encoder + tokenizer there ({e}).") from e
    return tokenizer, model.eval().requires_grad_(False)


def clip_token_ids(clip_tokenizer, captions: list[str], length: int) -> torch.Tensor:
    """Captions -> CLIP token ids [B, length], padded and truncated as SD1.5 encodes prompts."""
    return clip_tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                          return_tensors="pt").input_ids
