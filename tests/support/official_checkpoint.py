"""Tiny random checkpoints in the OFFICIAL Kosmos-G on-disk format (fairseq training checkpoint).

Key names and shapes follow the fact sheet (shared/spec/official-kosmos-g.md, section 1.1),
written out here independently of `kosmosg_core.checkpoint`, so tests can check the loader's key
table against it. Sizes come from a `KosmosGConfig` (e.g. `KosmosGConfig.tiny()`).

- `build_official_state_dict(cfg)`: the `state["model"]` dict (official names, tied LM head).
- `save_official_checkpoint(path, sd)`: a fairseq-style `torch.save` file with cfg (an omegaconf
  `DictConfig`), optimizer history, numpy scalars in `extra_state`, and an Adam state.
- `make_malicious_checkpoint(path, payload, marker)`: torch zip files whose pickle runs code
  (writes `marker`) under plain `torch.load(weights_only=False)` — for the safe loader's tests.
"""

from __future__ import annotations

import builtins
import collections
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from kosmosg_core.config import KosmosGConfig

# --- state dict ----------------------------------------------------------------------------------
# Each entry: name -> (shape, kind). Kinds pick the init in `_init_tensor`.


def _linear(out: dict, prefix: str, fan_out: int, fan_in: int, bias: bool = True) -> None:
    out[prefix + ".weight"] = ((fan_out, fan_in), "linear")
    if bias:
        out[prefix + ".bias"] = ((fan_out,), "bias")


def _layer_norm(out: dict, prefix: str, width: int) -> None:
    out[prefix + ".weight"] = ((width,), "ln_weight")
    out[prefix + ".bias"] = ((width,), "bias")


def _attention(out: dict, prefix: str, width: int, subln: bool) -> None:
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        _linear(out, f"{prefix}.{proj}", width, width)
    if subln:
        _layer_norm(out, prefix + ".inner_attn_ln", width)


def _torchscale_layer(out: dict, prefix: str, width: int, ffn_width: int, cross_attention: bool) -> None:
    """torchscale Encoder/Decoder layer with subLN (pre-LN; `final_layer_norm` is the pre-FFN norm)."""
    _attention(out, prefix + ".self_attn", width, subln=True)
    _layer_norm(out, prefix + ".self_attn_layer_norm", width)
    if cross_attention:
        _attention(out, prefix + ".encoder_attn", width, subln=False)  # no inner LN on cross-attention
        _layer_norm(out, prefix + ".encoder_attn_layer_norm", width)
    _linear(out, prefix + ".ffn.fc1", ffn_width, width)
    _layer_norm(out, prefix + ".ffn.ffn_layernorm", ffn_width)
    _linear(out, prefix + ".ffn.fc2", width, ffn_width)
    _layer_norm(out, prefix + ".final_layer_norm", width)


def official_tensor_specs(cfg: KosmosGConfig, stage2: bool = False, include_unused: bool = True) -> dict:
    """name -> (shape, kind) of an official checkpoint for `cfg` (output_projection listed as 'tied')."""
    d, v, a = cfg.decoder, cfg.vision, cfg.aligner
    specs: dict = {}

    # MLLM: torchscale Decoder subclass (LMDecoder)
    mllm = "gpt_model.decoder."
    specs[mllm + "embed_tokens.weight"] = ((d.vocab_size, d.width), "embed")
    specs[mllm + "output_projection.weight"] = ((d.vocab_size, d.width), "tied")
    specs[mllm + "embed_positions._float_tensor"] = ((1,), "float_marker")
    specs[mllm + "self_attn_sope.scale"] = ((d.width // d.heads // 2,), "sope_scale")
    for i in range(d.layers):
        _torchscale_layer(specs, f"{mllm}layers.{i}", d.width, d.ffn_width, cross_attention=False)
    _layer_norm(specs, mllm + "layer_norm", d.width)

    # Vision tower: open_clip ViT with the split `ts_attn` attention, no `proj`
    vis = "img_model.visual."
    specs[vis + "conv1.weight"] = ((v.width, 3, v.patch_size, v.patch_size), "linear")
    specs[vis + "class_embedding"] = ((v.width,), "embed")
    specs[vis + "positional_embedding"] = ((v.num_tokens, v.width), "position")
    _layer_norm(specs, vis + "ln_pre", v.width)
    mlp = int(v.width * v.mlp_ratio)
    for j in range(v.layers):
        block = f"{vis}transformer.resblocks.{j}"
        _attention(specs, block + ".ts_attn", v.width, subln=False)
        _layer_norm(specs, block + ".ln_1", v.width)
        _layer_norm(specs, block + ".ln_2", v.width)
        _linear(specs, block + ".mlp.c_fc", mlp, v.width)
        _linear(specs, block + ".mlp.c_proj", v.width, mlp)
    _layer_norm(specs, vis + "ln_post", v.width)

    # Connector (XConnector)
    _linear(specs, "img_connector.dense", d.width, v.width)
    specs["img_connector.latent_query"] = ((cfg.connector.num_queries, d.width), "query")
    _attention(specs, "img_connector.x_attn", d.width, subln=False)

    # Aligner_encoder
    _linear(specs, "aligner.encoder_proj.embed_tokens", a.width, d.width)
    specs["aligner.encoder_proj.embed_positions.weight"] = ((a.max_positions, a.width), "position")
    for k in range(a.encoder_layers):
        _torchscale_layer(specs, f"aligner.encoder_proj.layers.{k}", a.width, a.ffn_width, cross_attention=False)
    _layer_norm(specs, "aligner.encoder_proj.layer_norm", a.width)
    specs["aligner.encoder_query"] = ((a.num_queries, a.width), "query")
    for k in range(a.decoder_layers):
        _torchscale_layer(specs, f"aligner.encoder.layers.{k}", a.width, a.ffn_width, cross_attention=True)
    _layer_norm(specs, "aligner.encoder.layer_norm", a.width)

    if stage2:  # Aligner (stage 2): reconstruction branch + the frozen CLIP text encoder
        specs["aligner.decoder_query"] = ((a.max_positions, a.width), "query")
        for k in range(a.reconstruction_layers):
            _torchscale_layer(specs, f"aligner.decoder.layers.{k}", a.width, a.ffn_width, cross_attention=True)
        _layer_norm(specs, "aligner.decoder.layer_norm", a.width)
        specs["aligner.decoder_proj.embed_positions.weight"] = ((a.max_positions, a.width), "position")
        for k in range(a.reconstruction_layers):
            _torchscale_layer(specs, f"aligner.decoder_proj.layers.{k}", a.width, a.ffn_width, cross_attention=False)
        _layer_norm(specs, "aligner.decoder_proj.layer_norm", a.width)
        _linear(specs, "aligner.decoder_proj.output_projection", d.width, a.width)
        clip = "aligner.clip_encoder.text_model."
        specs[clip + "embeddings.token_embedding.weight"] = ((16, a.width), "embed")
        specs[clip + "embeddings.position_embedding.weight"] = ((a.num_queries, a.width), "position")
        _layer_norm(specs, clip + "final_layer_norm", a.width)

    if include_unused:  # SD1.5 U-Net / VAE submodules (diffusers names), stored but unused
        specs["diffusion_unet.unet.conv_in.weight"] = ((8, 4, 3, 3), "linear")
        specs["diffusion_unet.unet.conv_in.bias"] = ((8,), "bias")
        specs["diffusion_unet.unet.time_embedding.linear_1.weight"] = ((16, 8), "linear")
        specs["vae.vae.encoder.conv_in.weight"] = ((8, 3, 3, 3), "linear")
        specs["vae.vae.decoder.conv_out.weight"] = ((3, 8, 3, 3), "linear")
        specs["vae.vae.quant_conv.bias"] = ((8,), "bias")
    return specs


def _init_tensor(shape: tuple, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Random values that keep activations O(1) through the layers and make every tensor distinct."""
    def randn(*s):
        return torch.randn(*s, generator=generator)

    if kind == "linear":  # [out, in, ...]: std 1/sqrt(fan_in)
        fan_in = math.prod(shape[1:])
        return randn(*shape) / math.sqrt(fan_in)
    if kind == "bias":
        return 0.02 * randn(*shape)
    if kind == "ln_weight":  # not exactly 1: parity tests must notice swapped norms
        return 1.0 + 0.1 * randn(*shape)
    if kind == "embed":  # the MLLM scales by sqrt(width): stays O(1)
        return randn(*shape) / math.sqrt(shape[-1])
    if kind == "position":
        return 0.1 * randn(*shape)
    if kind == "query":  # official: torch.randn
        return randn(*shape)
    if kind == "float_marker":  # fairseq's `_float_tensor` (torch.FloatTensor(1)): content unused
        return torch.ones(shape)
    if kind == "sope_scale":  # xPos scale buffer: (arange(0, head_dim, 2) + 0.4 * head_dim) / (1.4 * head_dim)
        head_dim = 2 * shape[0]
        return (torch.arange(0, head_dim, 2, dtype=torch.float32) + 0.4 * head_dim) / (1.4 * head_dim)
    raise ValueError(f"unknown tensor kind {kind!r}")


def build_official_state_dict(cfg: KosmosGConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                              include_unused: bool = True, stage2: bool = False) -> dict[str, torch.Tensor]:
    """Random tensors under the official key names/shapes for `cfg`.

    `gpt_model.decoder.output_projection.weight` IS `embed_tokens.weight` (same tensor object, so
    torch.save stores one storage, as in official files). `stage2=True` adds the aligner's
    reconstruction branch and CLIP-encoder keys; `include_unused` a few U-Net / VAE tensors.
    """
    generator = torch.Generator().manual_seed(seed)
    specs = official_tensor_specs(cfg, stage2=stage2, include_unused=include_unused)
    state: dict[str, torch.Tensor] = {}
    for name, (shape, kind) in specs.items():
        if kind == "tied":
            continue
        state[name] = _init_tensor(shape, kind, generator).to(dtype)
    state["gpt_model.decoder.output_projection.weight"] = state["gpt_model.decoder.embed_tokens.weight"]
    return {name: state[name] for name in specs}  # the spec's order (embed, tied head, ...)


# --- the fairseq checkpoint file -----------------------------------------------------------------
def _fairseq_cfg(state_dict: dict, as_dictconfig: bool):
    width = state_dict["gpt_model.decoder.embed_tokens.weight"].shape[1]
    content = {
        "_name": None,
        "common": {"seed": 0, "fp16": False, "memory_efficient_fp16": True, "fp16_init_scale": 4,
                   "fp16_scale_window": 256, "log_interval": 100},
        "model": {"_name": "kosmosg_xl", "decoder_embed_dim": int(width), "subln": True, "sope_rel_pos": True,
                  "flash_attention": True, "checkpoint_activations": True, "dropout": 0.1},
        "task": {"_name": "kosmosg", "tokens_per_sample": 2048, "dict_path": "data/dict.txt",
                 "spm_model": "data/sentencepiece.bpe.model"},
        "optimizer": {"_name": "adam", "adam_betas": "(0.9,0.98)", "adam_eps": 1e-06, "weight_decay": 0.01},
        "lr_scheduler": {"_name": "polynomial_decay", "warmup_updates": 375, "total_num_update": 200000},
        "checkpoint": {"save_interval_updates": 2000, "no_save_optimizer_state": False},
    }
    if not as_dictconfig:
        return content  # what fairseq's trainer writes: OmegaConf.to_container(cfg)
    from omegaconf import OmegaConf  # test-only dependency (see requirements-test.txt)

    return OmegaConf.create(content)


def _adam_state(state_dict: dict, generator: torch.Generator) -> dict:
    """fairseq (MemoryEfficientFP16Optimizer over FairseqAdam) state: fp32 moments per parameter."""
    params = [name for name, t in state_dict.items()
              if t.is_floating_point() and not name.endswith(("_float_tensor", "self_attn_sope.scale"))
              and name != "gpt_model.decoder.output_projection.weight"]
    state = {
        index: {"step": 123,
                "exp_avg": 1e-3 * torch.randn(state_dict[name].shape, generator=generator),
                "exp_avg_sq": 1e-6 * torch.rand(state_dict[name].shape, generator=generator)}
        for index, name in enumerate(params)
    }
    groups = [{"lr": 0.001, "betas": (0.9, 0.98), "eps": 1e-06, "weight_decay": 0.01, "amsgrad": False,
               "params": list(range(len(params)))}]
    return {"state": state, "param_groups": groups, "loss_scale": 4.0}


def save_official_checkpoint(path, state_dict: dict, with_training_state: bool = True,
                             cfg_format: str = "dictconfig", seed: int = 0) -> Path:
    """Write `state_dict` as a fairseq training checkpoint (torch.save, zip format).

    with_training_state=False writes `{"model": ...}` only (a stripped release).
    cfg_format: "dictconfig" (a real omegaconf DictConfig: what older fairseq saved, and what
    `torch.load(weights_only=True)` refuses) or "container" (plain dicts: fairseq's trainer).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = collections.OrderedDict(state_dict)
    model._metadata = collections.OrderedDict({"": {"version": 1}})  # as nn.Module.state_dict() carries
    if not with_training_state:
        torch.save({"model": model}, path)
        return path
    generator = torch.Generator().manual_seed(seed + 1)
    checkpoint = {
        "args": None,
        "cfg": _fairseq_cfg(state_dict, as_dictconfig=(cfg_format == "dictconfig")),
        "model": model,
        "criterion": None,
        "optimizer_history": [{"criterion_name": "KosmosGLoss", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": None}, "num_updates": 123}],
        "task_state": {},
        "extra_state": {
            "epoch": 1,
            "train_iterator": {"version": 2, "epoch": 1, "iterations_in_epoch": 123, "shuffle": True},
            "val_loss": np.float64(2.5),  # fairseq keeps numpy scalars here (what weights_only trips on)
            "best": np.float64(2.25),
            "metrics": collections.OrderedDict(
                default=collections.OrderedDict(loss={"val": 2.5, "sum": 250.0, "count": 100, "round": 3})),
            "previous_training_time": 1.5,
        },
        "last_optimizer_state": _adam_state(state_dict, generator),
    }
    torch.save(checkpoint, path)
    return path


# --- malicious files (for the safe loader's tests) -----------------------------------------------
def write_marker(path: str) -> None:
    """An arbitrary function a pickle could call (stands for any code)."""
    Path(path).write_text("code ran")


class _SystemPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # pickled as REDUCE of `posix.system` / `nt.system`
        return os.system, (f'echo pwned > "{self.marker}"',)


class _EvalPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # REDUCE of builtins.eval
        return builtins.eval, (f"open({self.marker!r}, 'w').write('pwned')",)


class _SubprocessPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # REDUCE of subprocess.call (runs a program and waits)
        return subprocess.call, ([sys.executable, "-c", f"open({self.marker!r}, 'w').write('pwned')"],)


class _FunctionPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # REDUCE of an arbitrary importable function
        return write_marker, (self.marker,)


class MarkerOnSetstate:
    """A plain class whose `__setstate__` has a side effect: plain pickle runs it on BUILD (NEWOBJ path).

    The safe loader must turn it into an inert placeholder, without error and without the effect."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __setstate__(self, state):
        Path(state["marker"]).write_text("setstate ran")
        self.__dict__.update(state)


PAYLOADS = {
    "os_system": _SystemPayload,
    "eval": _EvalPayload,
    "subprocess": _SubprocessPayload,
    "function": _FunctionPayload,
}


def make_malicious_checkpoint(path, payload: str, marker, where: str = "extra_state",
                              state_dict: dict | None = None) -> Path:
    """A torch zip checkpoint with a valid-looking `model` and a code-running object at `where`.

    payload: one of PAYLOADS ("os_system", "eval", "subprocess", "function") — each writes `marker`
    when the pickle is loaded by plain pickle — or "setstate" (a `MarkerOnSetstate` object, which a
    safe loader must keep inert). where: "extra_state", "model" (inside the state dict) or
    "last_optimizer_state".
    """
    path = Path(path)
    state_dict = dict(state_dict) if state_dict is not None else {"gpt_model.decoder.layer_norm.weight": torch.ones(4)}
    obj = MarkerOnSetstate(marker) if payload == "setstate" else PAYLOADS[payload](marker)
    checkpoint = {"model": state_dict, "extra_state": {}, "last_optimizer_state": {}}
    if where == "model":
        checkpoint["model"]["evil"] = obj
    else:
        checkpoint[where]["evil"] = obj
    torch.save(checkpoint, path)
    return path
