"""Independent reference for Kosmos-G conditioning, written to follow the official code step by step.

This module exists only to check `kosmosg_core` against. It does not import `kosmosg_core`. It
re-expresses the official call path, `KosmosGmodel.encode_condition`. The official sources are
unilm/models/{kosmosg,gpt,connector,aligner}.py, unilm/models/vl/clip.py, the open_clip fork,
the torchscale fork and the vendored fairseq, at xichenpan/Kosmos-G f5c0489 (the same code as
microsoft/unilm kosmos-g/ 421c251). It keeps the official conventions:

- sequence-first `[T, B, C]` activations between layers, as in the torchscale fork and open_clip;
- modules and parameter names are the official ones, so the official state dict (key prefixes
  `img_model.visual.`, `img_connector.`, `gpt_model.decoder.`, `aligner.`) loads with
  `load_state_dict(strict=True)` into each part;
- transformer layers are PyPI `torchscale==0.3.0` modules: `EncoderLayer`, `DecoderLayer`,
  `MultiheadAttention` (subLN `inner_attn_ln`), `FeedForwardNetwork` (subLN `ffn_layernorm`) and
  `PositionalEmbedding`;
- the connector calls `F.multi_head_attention_forward` with the arguments fairseq's
  `MultiheadAttention` passes on its fast path;
- MLLM positions use the fairseq `SinusoidalPositionalEmbedding` formula with `make_positions`.

Where PyPI torchscale 0.3.0 differs from the official fork, this module adds glue, each piece
marked "FORK GLUE" (tests/test_reference_vs_official_source.py shows the differences do not matter
for the paths used):
1. The fork's `MultiheadAttention` is sequence-first `[T, B, C]`; PyPI 0.3.0's is batch-first
   `[B, T, C]`. Layers are called through `_batch_first_call`, which transposes at the boundary.
   The other layer operations (LayerNorm, FFN, residuals) are position-wise, so they do not
   depend on the layout.
2. The fork's `LMDecoder` (unilm/models/gpt.py) replaces torchscale's `Decoder.forward`. It
   writes image features into the token embeddings, passes no key-padding mask and no SoPE terms,
   and builds a causal float mask per layer. That forward is re-expressed in
   `OfficialLMDecoder.forward`. The SoPE module it constructs is only a buffer holder here, and it
   is never applied, as in the fork.
3. The fork's `flash_attention` branch (xformers `memory_efficient_attention` with
   `LowerTriangularMask`) is taken on GPU for the MLLM's causal self-attention. It computes the
   same math as the explicit softmax branch used here: default scale head_dim^-0.5, no key padding.
4. The fork's open_clip `ResidualAttentionBlock` uses a torchscale attention `ts_attn` (q/k/v/out
   projections, no subLN) instead of `nn.MultiheadAttention`; `OfficialResidualAttentionBlock`
   builds it from PyPI torchscale.

Only float32 inference is covered (dropout off, no LoRA).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ._torchscale import (
    DecoderConfig,
    DecoderLayer,
    EncoderDecoderConfig,
    EncoderLayer,
    MultiheadAttention,
    PositionalEmbedding,
)

# fairseq Dictionary specials (unilm/tasks: bos 0, pad 1, eos 2, unk 3)
BOS = 0
PAD = 1

# Official state-dict prefixes of the parts used by encode_condition.
VISION_PREFIX = "img_model.visual."
CONNECTOR_PREFIX = "img_connector."
MLLM_PREFIX = "gpt_model.decoder."
ALIGNER_PREFIX = "aligner."


# ------------------------------------------------------------------------------------------------
# fairseq sinusoidal positions (fairseq/modules/sinusoidal_positional_embedding.py, utils.make_positions)
# ------------------------------------------------------------------------------------------------
def fairseq_sinusoidal_table(num_embeddings: int, embedding_dim: int, padding_idx: int | None) -> torch.Tensor:
    """`SinusoidalPositionalEmbedding.get_embedding`: [num_embeddings, dim]; row padding_idx zeroed."""
    half_dim = embedding_dim // 2
    step = math.log(10000) / (half_dim - 1)
    freqs = torch.exp(torch.arange(half_dim, dtype=torch.float) * -step)
    angles = torch.arange(num_embeddings, dtype=torch.float).unsqueeze(1) * freqs.unsqueeze(0)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).view(num_embeddings, -1)
    if embedding_dim % 2 == 1:
        table = torch.cat([table, torch.zeros(num_embeddings, 1)], dim=1)
    if padding_idx is not None:
        table[padding_idx, :] = 0
    return table


def fairseq_make_positions(tokens: torch.Tensor, padding_idx: int, onnx_trace: bool = False) -> torch.Tensor:
    """`fairseq.utils.make_positions`: non-pad tokens count from padding_idx + 1, pads get padding_idx."""
    mask = tokens.ne(padding_idx).int()
    return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + padding_idx


class FairseqSinusoidalPositionalEmbedding(nn.Module):
    """fairseq `PositionalEmbedding(max_target_positions, dim, pad, learned=False)`, non-incremental path.

    The table is not a parameter; the only state-dict entry is the `_float_tensor` dtype marker."""

    def __init__(self, embedding_dim: int, padding_idx: int, init_size: int):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.weights = fairseq_sinusoidal_table(init_size, embedding_dim, padding_idx)
        self.register_buffer("_float_tensor", torch.FloatTensor(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, C]
        bsz, seq_len = tokens.shape
        max_pos = self.padding_idx + 1 + seq_len
        if max_pos > self.weights.size(0):  # fairseq recomputes a longer table on demand
            self.weights = fairseq_sinusoidal_table(max_pos, self.embedding_dim, self.padding_idx)
        self.weights = self.weights.to(self._float_tensor)
        positions = fairseq_make_positions(tokens, self.padding_idx)
        return self.weights.index_select(0, positions.view(-1)).view(bsz, seq_len, -1).detach()


# ------------------------------------------------------------------------------------------------
# FORK GLUE 1: PyPI torchscale 0.3.0 layers are batch-first, the fork's are sequence-first.
# ------------------------------------------------------------------------------------------------
def _batch_first_call(layer: nn.Module, x_tbc: torch.Tensor, **kwargs):
    """Call a PyPI torchscale layer on sequence-first x [T, B, C] (+ any sequence-first `encoder_out`)."""
    if kwargs.get("encoder_out") is not None:
        kwargs["encoder_out"] = kwargs["encoder_out"].transpose(0, 1)
    out = layer(x_tbc.transpose(0, 1), **kwargs)
    return (out[0].transpose(0, 1),) + tuple(out[1:])


# ------------------------------------------------------------------------------------------------
# Vision tower: unilm/models/vl/clip.py ClipVisualOnly + VisualTransformer4Seq2Seq + open_clip fork
# ------------------------------------------------------------------------------------------------
class OpenClipLayerNorm(nn.LayerNorm):
    """open_clip `LayerNorm`: layer norm, then cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig_type = x.dtype
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.to(orig_type)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class OfficialResidualAttentionBlock(nn.Module):
    """open_clip fork `ResidualAttentionBlock` after `create_model(..., pretrained=...)`.

    FORK GLUE 4: `attn` (nn.MultiheadAttention) was set to None and its weights copied into
    `ts_attn`, a torchscale attention (fork args: multiway False, no subLN). PyPI's MultiheadAttention
    also needs `layernorm_eps` / `xpos_rel_pos` in its args. With subln off they create nothing."""

    def __init__(self, d_model: int, n_head: int, mlp_ratio: float):
        super().__init__()
        args = SimpleNamespace(multiway=False, layernorm_eps=1e-5, xpos_rel_pos=False, xpos_scale_base=512)
        self.ts_attn = MultiheadAttention(args, d_model, n_head, self_attention=True)
        self.ln_1 = OpenClipLayerNorm(d_model)
        mlp_width = int(d_model * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, mlp_width)),
            ("gelu", QuickGELU()),  # kosmosg.load_image_model: force_quick_gelu for ViT-L-14
            ("c_proj", nn.Linear(mlp_width, d_model)),
        ]))
        self.ln_2 = OpenClipLayerNorm(d_model)

    def attention(self, x: torch.Tensor) -> torch.Tensor:  # [L, N, D]
        # fork: self.ts_attn(x, x, x, attn_mask=None)[0] on [L, N, D]; PyPI attention is batch-first.
        xb = x.transpose(0, 1)
        return self.ts_attn(xb, xb, xb, attn_mask=None)[0].transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [L, N, D]
        x = x + self.attention(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class OfficialTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.resblocks = nn.ModuleList([OfficialResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resblocks:
            x = r(x)
        return x


class OfficialVisualTransformer4Seq2Seq(nn.Module):
    """Keys under `img_model.visual.`; forward returns ln_post(all tokens), sequence-first [L, N, D], no proj."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = OpenClipLayerNorm(width)
        self.transformer = OfficialTransformer(width, layers, heads, mlp_ratio)
        self.ln_post = OpenClipLayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # [N, width, grid, grid]
        x = x.reshape(x.shape[0], x.shape[1], -1)  # [N, width, grid**2]
        x = x.permute(0, 2, 1)  # [N, grid**2, width]
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1)  # [N, grid**2 + 1, width]
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.transformer(x)
        return self.ln_post(x)  # [L, N, D]: seq2seq variant keeps all tokens, no proj


class OfficialClipVisualOnly(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.visual = OfficialVisualTransformer4Seq2Seq(**kwargs)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(image), dim=-1)  # [L, N, D]


# ------------------------------------------------------------------------------------------------
# Connector: unilm/models/connector.py XConnector with fairseq MultiheadAttention (fast path)
# ------------------------------------------------------------------------------------------------
class FairseqMultiheadAttentionWeights(nn.Module):
    """fairseq `MultiheadAttention(embed_dim, heads, kdim=vdim=embed_dim, encoder_decoder_attention=True)`:
    separate q/k/v/out projections with bias, no bias_k/bias_v, no zero-attn, no attn_ln."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=True)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=True)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=True)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=True)

    def forward(self, query, key, value):  # [T, B, C], [S, B, C], [S, B, C]
        # fairseq takes this PyTorch path when not tracing, not incremental, not static_kv and no attn_ln,
        # which is the XConnector's case (it calls x_attn(q, kv, kv) with defaults; need_weights=True).
        return F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads,
            torch.empty([0]),
            torch.cat((self.q_proj.bias, self.k_proj.bias, self.v_proj.bias)),
            None, None, False,  # bias_k, bias_v, add_zero_attn
            0.0,  # dropout p (eval)
            self.out_proj.weight, self.out_proj.bias,
            False,  # training
            None,  # key_padding_mask
            True,  # need_weights (fairseq default)
            None,  # attn_mask
            use_separate_proj_weight=True,
            q_proj_weight=self.q_proj.weight,
            k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight,
        )


class OfficialXConnector(nn.Module):
    def __init__(self, input_dim: int, output_dim: int, num_heads: int, latent_query_num: int):
        super().__init__()
        self.dense = nn.Linear(input_dim, output_dim)
        self.latent_query = nn.Parameter(torch.zeros(latent_query_num, output_dim))
        self.x_attn = FairseqMultiheadAttentionWeights(output_dim, num_heads)

    def forward(self, features: torch.Tensor, src_len: int) -> torch.Tensor:
        """features [N * L, Dv] (batch-major rows) -> [N * Q, D]."""
        x = self.dense(features)
        x = x.view(-1, src_len, x.size(-1)).transpose(0, 1)  # [L, N, D]
        bsz = x.size(1)
        latent_query = self.latent_query.unsqueeze(1).expand(-1, bsz, -1)  # [Q, N, D]
        kv = torch.cat([x, latent_query])  # [L + Q, N, D]
        x, _ = self.x_attn(latent_query, kv, kv)  # [Q, N, D]
        return x.transpose(0, 1).contiguous().view(-1, x.size(-1))


# ------------------------------------------------------------------------------------------------
# MLLM: unilm/models/gpt.py GPTmodel.build_model + LMDecoder (a torchscale Decoder subclass)
# ------------------------------------------------------------------------------------------------
class _SoPEBuffer(nn.Module):
    """FORK GLUE 2: the fork's `SoPE(head_dim)` buffer (built by --sope-rel-pos). LMDecoder.forward never uses it."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.register_buffer("scale", (torch.arange(0, head_dim, 2) + 0.4 * head_dim) / (1.4 * head_dim))


def mllm_torchscale_config(decoder_cfg) -> DecoderConfig:
    """torchscale `DecoderConfig().override(args)` with the effective kosmosg_xl + runapp.sh values."""
    return DecoderConfig(
        decoder_embed_dim=decoder_cfg.width,
        decoder_attention_heads=decoder_cfg.heads,
        decoder_ffn_embed_dim=decoder_cfg.ffn_width,
        decoder_layers=decoder_cfg.layers,
        decoder_normalize_before=True,
        activation_fn="gelu",
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, drop_path_rate=0.0,
        no_scale_embedding=False,  # fairseq arg default -> embed_scale sqrt(dim)
        layernorm_embedding=False,
        subln=True,  # --subln
        deepnorm=False,
        vocab_size=decoder_cfg.vocab_size,
        share_decoder_input_output_embed=True,
    )


class OfficialLMDecoder(nn.Module):
    """Keys under `gpt_model.decoder.`: embed_tokens, embed_positions._float_tensor, output_projection
    (tied), layers.{i}.*, layer_norm, self_attn_sope.scale."""

    def __init__(self, decoder_cfg):
        super().__init__()
        args = mllm_torchscale_config(decoder_cfg)
        dim = args.decoder_embed_dim
        self.embed_scale = 1.0 if args.no_scale_embedding else math.sqrt(dim)
        self.embed_tokens = nn.Embedding(decoder_cfg.vocab_size, dim, padding_idx=PAD)  # fairseq Embedding
        # fairseq PositionalEmbedding(max_target_positions, dim, pad, learned=False)
        self.embed_positions = FairseqSinusoidalPositionalEmbedding(dim, PAD, init_size=decoder_cfg.max_positions + PAD + 1)
        self.output_projection = nn.Linear(dim, decoder_cfg.vocab_size, bias=False)
        self.output_projection.weight = self.embed_tokens.weight  # share_decoder_input_output_embed
        self.layernorm_embedding = None
        self.layers = nn.ModuleList([DecoderLayer(args, depth=i, is_moe_layer=False, is_encoder_decoder=False)
                                     for i in range(args.decoder_layers)])
        self.layer_norm = nn.LayerNorm(dim)  # apex FusedLayerNorm, eps 1e-5
        self.self_attn_sope = _SoPEBuffer(dim // args.decoder_attention_heads)

    def forward_embedding(self, tokens, img_features=None, img_gpt_input_mask=None):
        positions = self.embed_positions(tokens)  # [B, T, C]; no chunk / segment embeddings
        token_embedding = self.embed_tokens(tokens)
        gpt_embed_output = token_embedding
        if img_features is not None:
            gpt_embed_output[img_gpt_input_mask] = img_features  # image slots overwritten, before scaling
        x = self.embed_scale * gpt_embed_output
        x += positions
        return x  # dropout off

    def forward(self, prev_output_tokens, img_features=None, img_gpt_input_mask=None):
        """-> (logits None, x [T, B, C]) like LMDecoder.forward with features_only semantics.

        The official forward also computes logits from the tied projection; encode_condition drops them."""
        x = self.forward_embedding(prev_output_tokens, img_features, img_gpt_input_mask)
        x = x.transpose(0, 1)  # [T, B, C]
        self_attn_padding_mask = None  # the LMDecoder.forward that wins builds none
        for layer in self.layers:
            self_attn_mask = torch.triu(torch.zeros([x.size(0), x.size(0)]).float().fill_(float("-inf")).type_as(x), 1)
            x, _, _, _ = _batch_first_call(layer, x, encoder_out=None, encoder_padding_mask=None,
                                           incremental_state=None, self_attn_mask=self_attn_mask,
                                           self_attn_padding_mask=self_attn_padding_mask)
        x = self.layer_norm(x)
        return None, x


# ------------------------------------------------------------------------------------------------
# AlignerNet: unilm/models/aligner.py Aligner_encoder (torchscale Encoder + Decoder, EncoderDecoderConfig)
# ------------------------------------------------------------------------------------------------
def aligner_torchscale_config(aligner_cfg) -> EncoderDecoderConfig:
    """Official: `EncoderDecoderConfig()` defaults (768 wide, 12 heads, 3072 FFN, 12 + 12 layers, subLN).
    The widths come from `aligner_cfg` so test-sized models can be checked."""
    return EncoderDecoderConfig(
        encoder_embed_dim=aligner_cfg.width, encoder_attention_heads=aligner_cfg.heads,
        encoder_ffn_embed_dim=aligner_cfg.ffn_width, encoder_layers=aligner_cfg.encoder_layers,
        decoder_embed_dim=aligner_cfg.width, decoder_attention_heads=aligner_cfg.heads,
        decoder_ffn_embed_dim=aligner_cfg.ffn_width, decoder_layers=aligner_cfg.decoder_layers,
    )


class OfficialAlignerEncoderProj(nn.Module):
    """torchscale `Encoder(cfg, embed_tokens=Linear(D, C), embed_positions=PositionalEmbedding(P, C),
    is_encoder_decoder=True)`; keys embed_tokens, embed_positions.weight, layers.{k}, layer_norm."""

    def __init__(self, args: EncoderDecoderConfig, mllm_width: int, max_positions: int):
        super().__init__()
        dim = args.encoder_embed_dim
        self.embed_scale = 1.0 if args.no_scale_embedding else math.sqrt(dim)
        self.embed_tokens = nn.Linear(mllm_width, dim)
        self.embed_positions = PositionalEmbedding(max_positions, dim)
        self.layers = nn.ModuleList([EncoderLayer(args, depth=i, is_moe_layer=False, is_encoder_decoder=True)
                                     for i in range(args.encoder_layers)])
        self.layer_norm = nn.LayerNorm(dim)  # encoder_normalize_before (subln) -> final norm
        # is_encoder_decoder=True and no output_projection given -> none

    def forward(self, src_tokens: torch.Tensor, encoder_padding_mask: torch.Tensor) -> dict:
        token_embedding = self.embed_tokens(src_tokens)  # src_tokens are the MLLM states [B, T, D]
        embed = self.embed_scale * token_embedding
        x = embed + self.embed_positions(src_tokens)  # rows 2 .. T+1, padding-independent
        x = x * (1 - encoder_padding_mask.unsqueeze(-1).type_as(x))
        x = x.transpose(0, 1)  # [T, B, C]
        for layer in self.layers:
            x, _ = _batch_first_call(layer, x, encoder_padding_mask=encoder_padding_mask, rel_pos=None)
        x = self.layer_norm(x)
        return {"encoder_out": x, "encoder_padding_mask": encoder_padding_mask}


class OfficialAlignerQueryDecoder(nn.Module):
    """torchscale `Decoder(cfg, is_encoder_decoder=True, causal_mask=False)` driven by token_embeddings;
    keys layers.{k} (with encoder_attn), layer_norm."""

    def __init__(self, args: EncoderDecoderConfig):
        super().__init__()
        dim = args.decoder_embed_dim
        self.embed_scale = 1.0 if args.no_scale_embedding else math.sqrt(dim)
        self.layers = nn.ModuleList([DecoderLayer(args, depth=i, is_moe_layer=False, is_encoder_decoder=True)
                                     for i in range(args.decoder_layers)])
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, token_embeddings: torch.Tensor, encoder_out: dict) -> torch.Tensor:
        x = self.embed_scale * token_embeddings  # no positions, no embedding LayerNorm
        x = x.transpose(0, 1)  # [Q, B, C]
        for layer in self.layers:
            # causal_mask=False -> self_attn_mask None; no self padding mask
            x, _, _, _ = _batch_first_call(layer, x, encoder_out=encoder_out["encoder_out"],
                                           encoder_padding_mask=encoder_out["encoder_padding_mask"],
                                           incremental_state=None, self_attn_mask=None, self_attn_padding_mask=None)
        x = self.layer_norm(x)
        return x.transpose(0, 1)  # [B, Q, C]; output_projection is None


class OfficialAlignerEncoder(nn.Module):
    """`Aligner_encoder`: keys encoder_proj.*, encoder_query, encoder.*."""

    def __init__(self, aligner_cfg, mllm_width: int):
        super().__init__()
        args = aligner_torchscale_config(aligner_cfg)
        self.encoder_proj = OfficialAlignerEncoderProj(args, mllm_width, aligner_cfg.max_positions)
        self.encoder_query = nn.Parameter(torch.zeros(aligner_cfg.num_queries, args.decoder_embed_dim))
        self.encoder = OfficialAlignerQueryDecoder(args)

    def forward(self, condition: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        condition = self.encoder_proj(condition, encoder_padding_mask=padding_mask)
        queries = self.encoder_query.unsqueeze(0).expand(condition["encoder_out"].shape[1], -1, -1)
        return self.encoder(queries, encoder_out=condition)


# ------------------------------------------------------------------------------------------------
# The whole conditioning path (kosmosg.py: get_image_representation + encode_condition)
# ------------------------------------------------------------------------------------------------
# Official keys that exist in checkpoint_final.pt but encode_condition never reads. They are
# dropped before the strict load (their presence is optional).
UNUSED_OFFICIAL_KEYS = (
    "gpt_model.decoder.output_projection.weight",  # tied to embed_tokens; logits are discarded
    "gpt_model.decoder.embed_positions._float_tensor",  # dtype marker of the computed table
    "gpt_model.decoder.self_attn_sope.scale",  # SoPE buffer, never applied (FORK GLUE 2)
)
IGNORED_OFFICIAL_PREFIXES = ("diffusion_unet.", "vae.", "aligner.clip_encoder.", "aligner.decoder_query",
                             "aligner.decoder.", "aligner.decoder_proj.")


def _part(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


class OfficialKosmosGReference(nn.Module):
    """img_model (ClipVisualOnly) + img_connector (XConnector) + gpt_model.decoder (LMDecoder) + aligner.

    `config_like` needs the attributes of `kosmosg_core.config.KosmosGConfig` (`vision`, `decoder`,
    `aligner`, `image_token_slots`); duck-typed so this module never imports the code under test.
    The connector uses the MLLM's head count, as the official `XConnector` does
    (`args.decoder_attention_heads`)."""

    def __init__(self, config_like):
        super().__init__()
        v, d, a = config_like.vision, config_like.decoder, config_like.aligner
        self.img_model = OfficialClipVisualOnly(image_size=v.image_size, patch_size=v.patch_size, width=v.width,
                                                layers=v.layers, heads=v.heads, mlp_ratio=v.mlp_ratio)
        self.img_connector = OfficialXConnector(v.width, d.width, d.heads, config_like.image_token_slots)
        self.gpt_decoder = OfficialLMDecoder(d)
        self.aligner = OfficialAlignerEncoder(a, d.width)

    @classmethod
    def from_official_state_dict(cls, state_dict: dict, config_like) -> "OfficialKosmosGReference":
        """Build and load the parts from official keys; every part is loaded with strict=True."""
        model = cls(config_like)
        known = set(UNUSED_OFFICIAL_KEYS)
        used = {k: v for k, v in state_dict.items() if k not in known and not k.startswith(IGNORED_OFFICIAL_PREFIXES)}
        for prefix in (VISION_PREFIX, CONNECTOR_PREFIX, MLLM_PREFIX, ALIGNER_PREFIX):
            if not any(k.startswith(prefix) for k in used):
                raise KeyError(f"official state dict has no {prefix}* tensors")
        stray = sorted(k for k in used if not k.startswith((VISION_PREFIX, CONNECTOR_PREFIX, MLLM_PREFIX, ALIGNER_PREFIX)))
        if stray:
            raise KeyError(f"unexpected official keys: {stray[:8]}")
        float32 = {k: v.float() if v.is_floating_point() else v for k, v in used.items()}
        model.img_model.visual.load_state_dict(_part(float32, VISION_PREFIX), strict=True)
        model.img_connector.load_state_dict(_part(float32, CONNECTOR_PREFIX), strict=True)
        mllm = _part(float32, MLLM_PREFIX)
        # The MLLM module also owns the three unused entries; fill them from the file when present
        # (the tied head must equal embed_tokens: same tensor in the official model).
        if "gpt_model.decoder.output_projection.weight" in state_dict:
            torch.testing.assert_close(state_dict["gpt_model.decoder.output_projection.weight"],
                                       state_dict["gpt_model.decoder.embed_tokens.weight"], rtol=0, atol=0)
        mllm["embed_positions._float_tensor"] = model.gpt_decoder.embed_positions._float_tensor
        mllm["self_attn_sope.scale"] = state_dict.get("gpt_model.decoder.self_attn_sope.scale",
                                                      model.gpt_decoder.self_attn_sope.scale).float()
        mllm["output_projection.weight"] = mllm["embed_tokens.weight"]
        model.gpt_decoder.load_state_dict(mllm, strict=True)
        model.aligner.load_state_dict(_part(float32, ALIGNER_PREFIX), strict=True)
        return model.eval()

    def get_image_representation(self, gpt_img_src_tokens: torch.Tensor) -> dict:
        img_output = self.img_model(gpt_img_src_tokens)  # [L, N, Dv], normalised
        src_len = img_output.size(0)
        vision_tokens = img_output.transpose(0, 1)  # T x B x C -> B x T x C
        flat = vision_tokens.reshape(-1, vision_tokens.size(-1))
        return {"vision_tokens": vision_tokens, "connector": self.img_connector(flat, src_len=src_len)}

    @torch.no_grad()
    def trace(self, input_ids: torch.Tensor, image_mask: torch.Tensor, pixel_values: torch.Tensor | None) -> dict:
        """encode_condition for the conditional branch, keeping every intermediate:
        vision_tokens [N, L, Dv], connector [N*Q, D], mllm_hidden [B, T, D], condition [B, Q77, C]."""
        out = {"vision_tokens": None, "connector": None}
        img_output = None
        if pixel_values is not None:
            out.update(self.get_image_representation(pixel_values.float()))
            img_output = out["connector"]
        condition = self.gpt_decoder(input_ids, img_features=img_output, img_gpt_input_mask=image_mask)[1].transpose(0, 1)
        out["mllm_hidden"] = condition
        out["condition"] = self.aligner(condition, input_ids.eq(PAD))
        return out

    @torch.no_grad()
    def unconditional(self, negative_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """encode_condition's null branch: max([[<s>]], negative_tokens, key=length) -> [1, Q77, C]."""
        null_token = torch.LongTensor([BOS]).unsqueeze(0)
        if negative_tokens is not None:
            null_token = max(null_token, negative_tokens, key=lambda x: x.shape[1])
        hidden = self.gpt_decoder(null_token)[1].transpose(0, 1)
        return self.aligner(hidden, null_token.eq(PAD))


def reference_condition(state_dict_official_names: dict, config_like, input_ids: torch.Tensor,
                        image_mask: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
    """Official conditioning [B, 77, C] for ids [B, T] long, image_mask [B, T] bool, pixels [N, 3, S, S]."""
    model = OfficialKosmosGReference.from_official_state_dict(state_dict_official_names, config_like)
    return model.trace(input_ids, image_mask, pixel_values)["condition"]


# ------------------------------------------------------------------------------------------------
# Prompt layout: app_model.py AppModel.kosmosg_preprocess
# ------------------------------------------------------------------------------------------------
def official_preprocess(text_transform, prompt: str, negative_prompt: str, num_images: int, bos_id: int,
                        boi_id: int, eoi_id: int, image_token_length: int = 64):
    """-> (src_tokens [1, T] long, img_gpt_input_mask [1, T] bool, negative_tokens [1, T'] long).

    `text_transform(text)` returns fairseq ids (the app's spm encode + dictionary lookup)."""
    assert num_images == prompt.count("<i>"), "Number of images in prompt does not match the number of images uploaded"
    src_tokens = [bos_id]
    img_gpt_input_mask = [0]
    for _ in range(num_images):
        text_snippet = prompt.split("<i>", 1)[0]
        prompt = prompt.split("<i>", 1)[1]
        text_token = text_transform(text_snippet)
        src_tokens.extend(text_token + [boi_id] * (image_token_length + 1) + [eoi_id])
        img_gpt_input_mask.extend([0] * len(text_token) + [0] + [1] * image_token_length + [0])
    text_token = text_transform(prompt)
    src_tokens.extend(text_token)
    img_gpt_input_mask.extend([0] * len(text_token))
    negative_tokens = torch.LongTensor([bos_id] + text_transform(negative_prompt))
    return (torch.LongTensor(src_tokens).unsqueeze(0), torch.tensor(img_gpt_input_mask, dtype=torch.bool).unsqueeze(0),
            negative_tokens.unsqueeze(0))


def right_pad_batch(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Official batched evaluation: pad src_tokens on the right with pad (1) and the mask with 0."""
    length = max(ids.shape[1] for ids, _ in rows)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (row_ids, row_mask) in enumerate(rows):
        ids[i, :row_ids.shape[1]] = row_ids[0]
        mask[i, :row_mask.shape[1]] = row_mask[0]
    return ids, mask


# ------------------------------------------------------------------------------------------------
# Text and image transforms: app_model.py _build_text_transform / _build_image_transform['gpt'],
# unilm/tasks/gpt_base.py (dictionary), unilm/data/vl/openimage_loader.py NumpyNormalize
# ------------------------------------------------------------------------------------------------
SPECIAL_SYMBOLS_ADDED = ("<mask>", "</doc>", "<image>", "</image>", "</chunk>", "</line>")  # "<mask>" + SPECIAL_SYMBOLS


class OfficialTextTransform:
    """fairseq `Dictionary.load(dict.txt)` + `add_symbol` of the task's specials + the app's text_transform:
    `spm.encode(text, out_type=str)` then `dictionary.index(piece)` (unknown pieces -> <unk>)."""

    def __init__(self, spm_model_path, dict_path):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model_path))
        self.indices = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
        with open(dict_path, encoding="utf-8") as f:
            for line in f:
                word = line.rstrip("\n").rsplit(" ", 1)[0]
                if word in self.indices:
                    raise ValueError(f"Duplicate word in dictionary: {word!r}")
                self.indices[word] = len(self.indices)
        for symbol in SPECIAL_SYMBOLS_ADDED:  # add_symbol keeps an existing index
            self.indices.setdefault(symbol, len(self.indices))
        self.bos_id, self.unk_id = 0, 3
        self.boi_id, self.eoi_id = self.indices["<image>"], self.indices["</image>"]

    def __len__(self) -> int:  # pad_to_multiple_(1) adds nothing
        return len(self.indices)

    def __call__(self, text: str) -> list[int]:
        return [self.indices.get(piece, self.unk_id) for piece in self.sp.encode(text, out_type=str)]


def official_image_transform(image_size: int = 224):
    """Compose([Resize(S, BICUBIC), CenterCrop(S), NumpyNormalize(CLIP mean, std)]) -> [3, S, S] float64 numpy."""
    import numpy as np
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Resize

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def numpy_normalize(img):
        image = np.array(img).transpose(2, 0, 1)
        image = image / 255.0
        image -= np.array(mean).reshape(-1, 1, 1)
        image /= np.array(std).reshape(-1, 1, 1)
        return image

    return Compose([Resize(image_size, interpolation=InterpolationMode.BICUBIC), CenterCrop(image_size), numpy_normalize])
