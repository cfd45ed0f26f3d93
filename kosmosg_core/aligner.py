"""AlignerNet (official unilm/models/aligner.py): MLLM states -> the SD1.5 text-encoder space.

`encoder_proj` (a bidirectional encoder over the MLLM's [B, T, D] states) feeds `encoder`, a
stack of query layers whose 77 learned queries cross-attend to it and come out as the U-Net's
`encoder_hidden_states` [B, 77, C]. Stage-2 training adds the reconstruction branch
(`decoder_query`, `decoder`, `decoder_proj`) that maps the 77 outputs back to the MLLM states.

Glossary: B batch, T text tokens, D MLLM width, C aligner width (= SD context width), L the 77 learned queries.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ALIGNER_FIRST_POSITION, AlignerConfig
from .layers import Embedding, MultiheadAttention, TransformerLayer, scale_subln_


class LayerStack(nn.Module):
    """`layers` + final `layer_norm` (torchscale Encoder / Decoder bodies, pre-LN)."""

    def __init__(self, cfg: AlignerConfig, num_layers: int, cross_attention: bool):
        super().__init__()
        self.layers = nn.ModuleList([
            TransformerLayer(cfg.width, cfg.heads, cfg.ffn_width, cross_attention=cross_attention,
                             layer_norm_eps=cfg.layer_norm_eps, dropout=cfg.dropout, attention_dropout=cfg.dropout)
            for _ in range(num_layers)
        ])
        self.layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, self_padding_mask: torch.Tensor | None = None,
                memory: torch.Tensor | None = None, memory_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, C] (self_padding_mask [B, T], True = pad); memory [B, S, C] for cross-attention (its mask
        [B, S]) -> [B, T, C], after the final LayerNorm."""
        kwargs = dict(self_padding_mask=self_padding_mask, memory=memory, memory_padding_mask=memory_padding_mask)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, use_reentrant=False, **kwargs)
            else:
                x = layer(x, **kwargs)
        return self.layer_norm(x)


class InputEncoder(LayerStack):
    """torchscale Encoder with a Linear "embedding" and learned positions starting at 2.

    Positions do not depend on padding (rows 2 .. T+1); padded inputs are zeroed after the
    positions are added, and padded keys are masked in every layer.
    """

    def __init__(self, cfg: AlignerConfig, in_width: int | None, out_width: int | None = None,
                 num_layers: int | None = None):
        super().__init__(cfg, cfg.encoder_layers if num_layers is None else num_layers, cross_attention=False)
        self.embed_tokens = nn.Linear(in_width, cfg.width) if in_width is not None else None
        self.embed_positions = Embedding(cfg.max_positions, cfg.width)
        self.output_projection = nn.Linear(cfg.width, out_width) if out_width is not None else None

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, in_width] (or [B, T, C] without embed_tokens; padding_mask [B, T], True = pad) -> [B, T, out_width]
        (or [B, T, C] without output_projection)."""
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)  # [B, T, C]
        T = x.shape[1]
        first, rows = ALIGNER_FIRST_POSITION, self.embed_positions.num_embeddings
        if first + T > rows:
            raise ValueError(f"Aligner input has {T} tokens but its position table holds {rows - first}.")
        x = x + self.embed_positions.weight[first:first + T].to(x.dtype)  # official: positions 2 .. T+1
        if padding_mask is not None:
            x = x * (~padding_mask)[..., None].to(x.dtype)
        x = super().forward(x, self_padding_mask=padding_mask)
        return self.output_projection(x) if self.output_projection is not None else x


class Aligner(nn.Module):
    """AlignerNet: `encoder_proj` (InputEncoder over the MLLM states) -> `encoder` (77 queries cross-attending to
    them) -> SD1.5 context; plus the stage-2 reconstruction branch when the config asks for it."""

    def __init__(self, cfg: AlignerConfig, mllm_width: int):
        super().__init__()
        self.cfg = cfg
        self.encoder_proj = InputEncoder(cfg, in_width=mllm_width)
        self.encoder_query = nn.Parameter(torch.randn(cfg.num_queries, cfg.width))  # official: randn
        self.encoder = LayerStack(cfg, cfg.decoder_layers, cross_attention=True)
        if cfg.with_reconstruction:
            self.decoder_query = nn.Parameter(torch.randn(cfg.max_positions, cfg.width))
            self.decoder = LayerStack(cfg, cfg.reconstruction_layers, cross_attention=True)
            self.decoder_proj = InputEncoder(cfg, in_width=None, out_width=mllm_width,
                                             num_layers=cfg.reconstruction_layers)
        self.init_like_torchscale()

    def _stacks(self) -> list[tuple[nn.Module, float]]:
        """Each layer stack with its torchscale subLN factor. The official aligner builds every stack from one
        config, so encoder_layers / decoder_layers are its two depths."""
        enc, dec = self.cfg.encoder_layers, self.cfg.decoder_layers
        stacks = [(self.encoder_proj, math.sqrt(math.log(3 * dec) * math.log(2 * enc) / 3)),  # torchscale Encoder, enc-dec
                  (self.encoder, math.sqrt(math.log(3 * dec)))]  # torchscale Decoder, enc-dec
        if self.cfg.with_reconstruction:
            recon = self.cfg.reconstruction_layers
            stacks += [(self.decoder, math.sqrt(math.log(3 * recon))),
                       (self.decoder_proj, math.sqrt(math.log(2 * recon)))]  # torchscale Encoder alone
        return stacks

    def init_like_torchscale(self) -> None:
        """The official fresh initialisation (what stage 2 starts from; loading a checkpoint replaces it).

        PyTorch's own Linear / LayerNorm init (torchscale's MultiheadAttention defines a xavier
        `reset_parameters`, but the official code never calls it), then torchscale's subLN scaling: fc1, fc2,
        out_proj and v_proj weights and biases of each stack times a depth factor (cross-attention excluded in
        the query stacks). The queries are random (official randn): zero queries would make all 77 outputs
        equal at the start and learn about half as fast (nano probe: 10 % vs 22 % of the held-out
        between-caption variance after 375 steps).
        """
        for stack, subln_scale in self._stacks():
            scale_subln_(stack, subln_scale, skip="encoder_attn")

    def reset_attention_xavier(self) -> None:
        """Re-initialise every attention as torchscale's uncalled `MultiheadAttention.reset_parameters` would
        (xavier-uniform q/k/v with gain 2^-1/2 and out_proj, zero out_proj bias), keeping the subLN scaling: the
        init this repo's stage 2 used before it followed the official one (the shipped nano's run). Called
        right after `init_like_torchscale` with no random draw between, it gives that init bit for bit."""
        for stack, subln_scale in self._stacks():
            for module in stack.modules():
                if isinstance(module, MultiheadAttention):
                    module.reset_xavier()
            # the weights just replaced, scaled again
            scale_subln_(stack, subln_scale, skip="encoder_attn", parts=("out_proj.weight", "v_proj.weight"))

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        for module in self.modules():
            if isinstance(module, LayerStack):
                module.gradient_checkpointing = enabled

    def forward(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """MLLM states [B, T, D] (+ pad mask [B, T], True = pad) -> SD context [B, L, C]."""
        memory = self.encoder_proj(hidden, padding_mask)  # [B, T, C]
        queries = self.encoder_query.to(memory.dtype).expand(hidden.shape[0], -1, -1)  # [B, L, C]
        # Queries have no positions and no mask among themselves; they see only real text tokens.
        return self.encoder(queries, memory=memory, memory_padding_mask=padding_mask)

    def reconstruct(self, context: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Stage-2 reconstruction branch: context [B, L, C] -> MLLM states [B, T, D].

        T queries (`decoder_query[:T]`) cross-attend to the 77 outputs (no mask), then
        `decoder_proj` (learned positions, encoder layers, Linear C -> D)."""
        if not self.cfg.with_reconstruction:
            raise RuntimeError("This Aligner was built without the reconstruction branch (with_reconstruction=False).")
        queries = self.decoder_query[:num_tokens].to(context.dtype).expand(context.shape[0], -1, -1)
        x = self.decoder(queries, memory=context)
        return self.decoder_proj(x)
