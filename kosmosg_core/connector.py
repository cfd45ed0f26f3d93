"""Connector (official `XConnector`): a one-layer resampler from image tokens to Q latent slots.

Glossary: N images, V image tokens (1 + patches), Dv vision width, Q latent queries (= image slots), D MLLM width.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ConnectorConfig
from .layers import MultiheadAttention


class Connector(nn.Module):
    def __init__(self, vision_width: int, mllm_width: int, cfg: ConnectorConfig):
        super().__init__()
        self.dense = nn.Linear(vision_width, mllm_width)
        self.latent_query = nn.Parameter(torch.zeros(cfg.num_queries, mllm_width))
        self.x_attn = MultiheadAttention(mllm_width, cfg.heads, subln=False, dropout=cfg.attention_dropout)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """image_tokens [N, V, Dv] -> image embeddings [N, Q, D]."""
        x = self.dense(image_tokens)  # [N, V, D]
        queries = self.latent_query.to(x.dtype).expand(x.shape[0], -1, -1)  # [N, Q, D]
        # Like Flamingo's resampler, keys/values are the image tokens *plus* the queries themselves.
        key_value = torch.cat([x, queries], dim=1)  # [N, V+Q, D]
        # No residual, no LayerNorm, no FFN: the official connector is just this attention.
        return self.x_attn(queries, key_value)
