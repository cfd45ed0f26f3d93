"""Transformer parts shared by the MLLM decoder and AlignerNet.

Parameter names are torchscale's (`q_proj`, `inner_attn_ln`, `ffn.fc1`, `ffn_layernorm`,
`self_attn_layer_norm`, `final_layer_norm`, ...), so an official layer's keys load 1:1.

Glossary: B batch, T query length, S key/value length, D width, H heads, K head dim.
Tensors are batch-first here; the official code is sequence-first ([T, B, D]). The weights do
not depend on that layout, so official tensors load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Embedding(nn.Embedding):
    """nn.Embedding whose weights are not initialised on the meta device (shapes only: checkpoints are built there
    before their tensors are assigned). `normal_` on meta imports PyTorch's compiler stack, ~1.5 s once per process,
    the most of opening a checkpoint; on a real device it initialises as nn.Embedding does."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


def gelu_float32(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU computed in float32, then cast back (official torchscale FFN)."""
    return F.gelu(x.float()).type_as(x)


class MultiheadAttention(nn.Module):
    """Multi-head attention with optional subLN (a LayerNorm on the merged heads before out_proj).

    Scores are scaled by K^-0.5 (torchscale's `scaling`), computed with
    `scaled_dot_product_attention`.
    """

    def __init__(self, width: int, heads: int, subln: bool, layer_norm_eps: float = 1e-5, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.dropout = dropout
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.inner_attn_ln = nn.LayerNorm(width, eps=layer_norm_eps) if subln else None

    def forward(
        self,
        query: torch.Tensor,  # [B, T, D]
        key_value: torch.Tensor,  # [B, S, D]
        key_padding_mask: torch.Tensor | None = None,  # [B, S] True where the key is padding
        causal: bool = False,
    ) -> torch.Tensor:
        B, T, D = query.shape
        S = key_value.shape[1]
        q = self.q_proj(query).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, K]
        k = self.k_proj(key_value).view(B, S, self.heads, self.head_dim).transpose(1, 2)  # [B, H, S, K]
        v = self.v_proj(key_value).view(B, S, self.heads, self.head_dim).transpose(1, 2)  # [B, H, S, K]

        attn_mask = None  # boolean, True = may attend
        # Causal without padding: SDPA's own causal path (same result, no mask to build: fewer kernels)
        is_causal = causal and key_padding_mask is None and T == S
        if key_padding_mask is not None:
            attn_mask = ~key_padding_mask[:, None, None, :]  # [B, 1, 1, S]
        if causal and not is_causal:
            causal_mask = torch.ones(T, S, dtype=torch.bool, device=query.device).tril(diagonal=S - T)
            attn_mask = causal_mask if attn_mask is None else attn_mask & causal_mask
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout,
                                             is_causal=is_causal)  # [B, H, T, K]
        out = out.transpose(1, 2).reshape(B, T, D)  # [B, T, D]
        if self.inner_attn_ln is not None:
            out = self.inner_attn_ln(out)
        return self.out_proj(out)

    @torch.no_grad()
    def reset_xavier(self) -> None:
        """fairseq's / torchscale's own `reset_parameters`: xavier-uniform q/k/v with gain 2^-1/2 and out_proj, zero
        out_proj bias (in this order: the same random draws)."""
        for projection in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(projection.weight, gain=2 ** -0.5)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)


SUBLN_SCALED = ("fc1", "fc2", "out_proj", "v_proj")  # the parameters torchscale's subLN init scales


@torch.no_grad()
def scale_subln_(stack: nn.Module, factor: float, skip: str | None = None, parts: tuple[str, ...] = SUBLN_SCALED) -> None:
    """torchscale's subLN init of a layer stack: the weights and biases of fc1, fc2, out_proj and v_proj (`parts`)
    times the stack's depth factor; parameters whose name holds `skip` (e.g. "encoder_attn", cross-attention) left
    as they are."""
    for name, parameter in stack.named_parameters():
        if (skip is None or skip not in name) and any(part in name for part in parts):
            parameter.mul_(factor)


class FeedForward(nn.Module):
    """fc1 -> GELU (float32) -> activation dropout -> subLN -> fc2 (torchscale FeedForwardNetwork with subln; its
    output dropout is the layer's residual dropout here)."""

    def __init__(self, width: int, ffn_width: int, layer_norm_eps: float = 1e-5, activation_dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(width, ffn_width)
        self.ffn_layernorm = nn.LayerNorm(ffn_width, eps=layer_norm_eps)
        self.fc2 = nn.Linear(ffn_width, width)
        self.activation_dropout = nn.Dropout(activation_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation_dropout(gelu_float32(self.fc1(x)))
        return self.fc2(self.ffn_layernorm(x))


class TransformerLayer(nn.Module):
    """Pre-LN layer: self-attention (+ optional cross-attention) + FFN, plain residuals (no deepnorm).

    Self-attention and FFN carry subLN; cross-attention does not (torchscale builds
    `encoder_attn` with subln off).
    """

    def __init__(self, width: int, heads: int, ffn_width: int, cross_attention: bool = False,
                 layer_norm_eps: float = 1e-5, dropout: float = 0.0, attention_dropout: float = 0.0,
                 activation_dropout: float = 0.0):
        super().__init__()
        self.self_attn = MultiheadAttention(width, heads, subln=True, layer_norm_eps=layer_norm_eps,
                                            dropout=attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(width, eps=layer_norm_eps)
        if cross_attention:
            self.encoder_attn = MultiheadAttention(width, heads, subln=False, layer_norm_eps=layer_norm_eps,
                                                   dropout=attention_dropout)
            self.encoder_attn_layer_norm = nn.LayerNorm(width, eps=layer_norm_eps)
        else:
            self.encoder_attn = None
        self.ffn = FeedForward(width, ffn_width, layer_norm_eps, activation_dropout)
        self.final_layer_norm = nn.LayerNorm(width, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, D]
        self_padding_mask: torch.Tensor | None = None,  # [B, T]
        causal: bool = False,
        memory: torch.Tensor | None = None,  # [B, S, D] cross-attention keys/values
        memory_padding_mask: torch.Tensor | None = None,  # [B, S]
    ) -> torch.Tensor:
        h = self.self_attn_layer_norm(x)
        x = x + self.dropout(self.self_attn(h, h, key_padding_mask=self_padding_mask, causal=causal))
        if self.encoder_attn is not None:
            h = self.encoder_attn_layer_norm(x)
            x = x + self.dropout(self.encoder_attn(h, memory, key_padding_mask=memory_padding_mask))
        x = x + self.dropout(self.ffn(self.final_layer_norm(x)))
        return x
