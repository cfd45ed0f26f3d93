"""The multimodal LLM (official `GPTmodel` / `LMDecoder` on a torchscale `Decoder`).

Pre-LN decoder with subLN, fairseq sinusoidal absolute positions (the SoPE/xPos module the
official code builds is never applied), embeddings scaled by sqrt(D) — image features too,
because they are written into the token embeddings before the scaling.

Glossary: B batch, T tokens, D width, Q image slots per image, N images.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import PAD_ID, DecoderConfig
from .layers import Embedding, TransformerLayer


def sinusoidal_positions(input_ids: torch.Tensor, width: int, padding_idx: int = PAD_ID) -> torch.Tensor:
    """fairseq `SinusoidalPositionalEmbedding` for ids [B, T] -> [B, T, D] (float32).

    Non-pad tokens get positions padding_idx+1, +2, ... (2, 3, ... for the official pad id 1);
    pad tokens get the all-zero row. Row p is [sin(p f_i) | cos(p f_i)], f_i = exp(-i ln(1e4) / (half - 1)).
    """
    not_pad = input_ids.ne(padding_idx)
    positions = torch.cumsum(not_pad, dim=1) * not_pad + padding_idx  # [B, T]
    half = width // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=input_ids.device) * -(math.log(10000.0) / (half - 1)))
    angles = positions.float()[..., None] * freqs  # [B, T, half]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # [B, T, 2*half]
    if width % 2:
        table = torch.nn.functional.pad(table, (0, 1))
    return table * not_pad[..., None]


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.width, padding_idx=PAD_ID)
        self.embed_scale = math.sqrt(cfg.width) if cfg.scale_embedding else 1.0
        self.layers = nn.ModuleList([
            TransformerLayer(cfg.width, cfg.heads, cfg.ffn_width, layer_norm_eps=cfg.layer_norm_eps,
                             dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
                             activation_dropout=cfg.activation_dropout)
            for _ in range(cfg.layers)
        ])
        self.layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None,
              image_mask: torch.Tensor | None) -> torch.Tensor:
        """ids [B, T] + image embeddings [N*Q, D] written into the slots of image_mask [B, T] -> [B, T, D]."""
        tokens = self.embed_tokens(input_ids)  # [B, T, D]
        if image_embeds is not None and image_mask is not None and image_mask.any():
            slots = int(image_mask.sum())
            if image_embeds.shape[0] != slots:
                raise ValueError(f"{slots} image slots in the prompt but {image_embeds.shape[0]} image embeddings given.")
            tokens = tokens.masked_scatter(image_mask[..., None], image_embeds.to(tokens.dtype))
        positions = sinusoidal_positions(input_ids, self.cfg.width).to(tokens.dtype)
        return self.dropout(self.embed_scale * tokens + positions)

    def forward(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """-> last hidden state after the final LayerNorm, [B, T, D].

        Only the causal mask is applied (the official LMDecoder builds no key-padding mask);
        with right padding, real tokens never see pads.
        """
        x = self.embed(input_ids, image_embeds, image_mask)
        for layer in self.layers:
            if self.cfg.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, causal=True, use_reentrant=False)
            else:
                x = layer(x, causal=True)
        return self.layer_norm(x)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied output projection (official share_decoder_input_output_embed): [B, T, D] -> [B, T, V]."""
        return hidden @ self.embed_tokens.weight.t()
