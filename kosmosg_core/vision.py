"""CLIP ViT image encoder, as Kosmos-G uses it (official unilm/models/vl/clip.py).

Differences from a stock CLIP vision tower, all on purpose: `ln_post` is applied to every token
(not just CLS), there is no projection head, and every output token is L2-normalised.
MLP activation is QuickGELU (open_clip's ViT-L-14 config forces it).

Glossary: N images, S image side, P patches, W width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .layers import MultiheadAttention


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class VisionMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class VisionBlock(nn.Module):
    """open_clip ResidualAttentionBlock with the official split q/k/v attention (`ts_attn`), no subLN."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = MultiheadAttention(cfg.width, cfg.heads, subln=False)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg.width, int(cfg.width * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 1+P, W]
        h = self.ln_1(x)
        x = x + self.attn(h, h)
        return x + self.mlp(self.ln_2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.num_tokens, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.resblocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.layers)])
        self.ln_post = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] (CLIP-normalised) -> L2-normalised tokens [N, 1+P, W]."""
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype))  # [N, W, S/p, S/p]
        x = x.flatten(2).transpose(1, 2)  # [N, P, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [N, 1, W]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [N, 1+P, W]
        x = self.ln_pre(x)
        for block in self.resblocks:
            x = block(x)
        x = self.ln_post(x)  # official: on all tokens, and no `proj`
        return F.normalize(x, dim=-1)

    def trainable_parameter_names(self) -> list[str]:
        """Stage 3 trains only the last `trainable_last_blocks` blocks and ln_post (official --no-freeze-layer)."""
        first = self.cfg.layers - self.cfg.trainable_last_blocks
        keep = tuple(f"resblocks.{i}." for i in range(first, self.cfg.layers)) + ("ln_post.",)
        return [name for name, _ in self.named_parameters() if name.startswith(keep)]
