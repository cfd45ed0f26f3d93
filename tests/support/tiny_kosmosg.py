"""Tiny random Kosmos-G models for tests: the pack .safetensors format and the official .pt format."""

from __future__ import annotations

from pathlib import Path

import torch

from kosmosg_core.checkpoint import save_pack_checkpoint, to_official_state_dict
from kosmosg_core.config import KosmosGConfig
from kosmosg_core.model import KosmosG
from kosmosg_core.tokenizer import KosmosGTokenizer

from .tokenizer_fixture import build_tiny_tokenizer


def tiny_config(tokenizer: KosmosGTokenizer, context_dim: int = 768) -> KosmosGConfig:
    return KosmosGConfig.tiny(vocab_size=tokenizer.vocab_size, context_dim=context_dim)


def random_kosmosg(cfg: KosmosGConfig, seed: int = 0) -> KosmosG:
    """Random weights with O(1) activations and non-trivial LayerNorm affines (so swapped norms show)."""
    generator = torch.Generator().manual_seed(seed)
    model = KosmosG(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
            else:
                fan_in = p.shape[-1] if p.ndim == 2 else p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) / fan_in ** 0.5)
    return model


def write_tiny_pack(directory, context_dim: int = 768, seed: int = 0, dtype=None, name="tiny-kosmosg.safetensors"):
    """-> (checkpoint path, tokenizer dir, model) with the tokenizer embedded in the checkpoint."""
    directory = Path(directory)
    tok_dir = build_tiny_tokenizer(directory / "tokenizer")
    tokenizer = KosmosGTokenizer.from_dir(tok_dir)
    model = random_kosmosg(tiny_config(tokenizer, context_dim), seed)
    path = save_pack_checkpoint(model, tokenizer, directory / name, dtype=dtype)
    return path, tok_dir, model


def write_tiny_official(directory, context_dim: int = 768, seed: int = 0, name="checkpoint_final.pt"):
    """-> (.pt path in the official fairseq layout, tokenizer dir, model); a sidecar JSON gives the
    head counts (tiny heads are not 64 wide, so shapes alone cannot tell them)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok_dir = build_tiny_tokenizer(directory / "data")
    tokenizer = KosmosGTokenizer.from_dir(tok_dir)
    cfg = tiny_config(tokenizer, context_dim)
    model = random_kosmosg(cfg, seed)
    path = directory / name
    torch.save({"model": to_official_state_dict(model.state_dict()), "args": None, "extra_state": {"epoch": 1}}, path)
    path.with_suffix(".json").write_text(cfg.to_json())
    return path, tok_dir, model
