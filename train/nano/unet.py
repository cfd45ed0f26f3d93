"""Narrow nano U-Net that computes exactly what ComfyUI's 320-wide 1-level SD1.5 U-Net computes.

Stock ComfyUI detects a U-Net as SD1.5 only when it is 320 wide (``model_channels``) with a 768
cross-attention context. A 320-wide network costs ~5 s per training step on two CPU cores, so we
train a *narrow* network whose ``real_channels`` (e.g. 64) live at fixed positions inside the
320-wide layout, and whose every normalisation, attention scale and embedding is computed the way
the padded network computes it when all other channels are zero. Zero-padding the trained weights
(:meth:`NanoUNet.to_padded_state_dict`) then gives a 320-wide state dict that ComfyUI's
``UNetModel`` (``openaimodel.py``) loads with ``strict=True`` and that produces the same output.

Padded network (ComfyUI's ``UNetModel`` with in/out 4, model_channels 320, channel_mult [1],
num_res_blocks [1], num_heads 8, use_spatial_transformer, transformer_depth [1],
transformer_depth_output [1, 1], transformer_depth_middle 1, context_dim 768,
use_linear_in_transformer False, legacy False)::

    input_blocks.0   conv 4 -> C
    input_blocks.1   ResBlock(C -> C), SpatialTransformer(C)
    middle_block     ResBlock(C), SpatialTransformer(C), ResBlock(C)
    output_blocks.0  ResBlock(2C -> C), SpatialTransformer(C)     (input: cat[h, skip])
    output_blocks.1  ResBlock(2C -> C), SpatialTransformer(C)
    out              GroupNorm(32, C), SiLU, conv C -> 4

Why the narrow computation is exact (padded channels stay zero through the whole network):
- linear / conv layers: rows and columns outside the real positions are zero, biases too;
- GroupNorm(32): a padded group of ``g = C_pad / 32`` channels holds ``k`` real channels and
  ``g - k`` zero channels. Its mean is ``sum(real) / (g * H * W)`` and its (biased) variance is
  ``[sum((real - mean)^2) + (g - k) * H * W * mean^2] / (g * H * W)``. Zero channels then become
  ``(0 - mean) / std * 0 + 0 = 0`` because their affine weight and bias are zero;
- LayerNorm over the 320-wide transformer stream: the same formula with one group of 320;
- attention: 8 heads of padded dim 40; each head holds ``real / 8`` real dims, the zero dims add
  nothing to ``q . k`` and the softmax scale stays ``1 / sqrt(40)``;
- the sinusoidal timestep embedding is 320 wide (an input, not padded); the time MLP's hidden
  width (1280 padded) and the GEGLU inner width (1280 padded) are narrowed too, with no norm on
  them, so any positions work.

Real channel ``j`` of a ``real``-wide space sits at padded position ``floor(j * padded / real)``:
this spreads real channels evenly, puts exactly ``real / 8`` of them in each head and, when
``real`` is a multiple of 32, the same number in every GroupNorm group (fast reshape path).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

GROUPNORM_GROUPS = 32  # fixed by ComfyUI's openaimodel / attention modules
RESBLOCK_NORM_EPS = 1e-5  # ResBlock and output GroupNorm: torch default
TRANSFORMER_NORM_EPS = 1e-6  # SpatialTransformer.norm
LAYERNORM_EPS = 1e-5  # BasicTransformerBlock norm1/2/3: torch default
MAX_PERIOD = 10000  # sinusoidal timestep embedding


@dataclasses.dataclass(frozen=True)
class NanoUNetConfig:
    """Widths of the narrow network and of the padded (ComfyUI SD1.5) network it stands for.

    ``time_embed_channels`` / ``ff_inner_channels`` default to ``4 * real_channels`` (the padded
    network uses ``4 * padded_channels`` = 1280 for both).
    """

    real_channels: int = 64
    padded_channels: int = 320
    time_embed_channels: int | None = None
    ff_inner_channels: int | None = None
    num_heads: int = 8
    context_dim: int = 768
    in_channels: int = 4
    out_channels: int = 4

    @property
    def time_embed_real(self) -> int:
        return self.time_embed_channels or 4 * self.real_channels

    @property
    def ff_inner_real(self) -> int:
        return self.ff_inner_channels or 4 * self.real_channels

    @property
    def padded_head_dim(self) -> int:
        return self.padded_channels // self.num_heads

    def padded(self) -> "NanoUNetConfig":
        """The config of the full-width network (every channel real)."""
        return dataclasses.replace(
            self,
            real_channels=self.padded_channels,
            time_embed_channels=4 * self.padded_channels,
            ff_inner_channels=4 * self.padded_channels,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "NanoUNetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"NanoUNetConfig: unknown keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**data)

    def validate(self) -> None:
        c, p, h = self.real_channels, self.padded_channels, self.num_heads
        if p % GROUPNORM_GROUPS or p % h:
            raise ValueError(f"padded_channels={p} must be a multiple of {GROUPNORM_GROUPS} and of num_heads={h}")
        if not 0 < c <= p or c % h:
            raise ValueError(f"real_channels={c} must be in 1..{p} and a multiple of num_heads={h} (e.g. 48, 64, 96)")
        for name, real in (("time_embed_channels", self.time_embed_real), ("ff_inner_channels", self.ff_inner_real)):
            if not 0 < real <= 4 * p:
                raise ValueError(f"{name}={real} must be in 1..{4 * p} (the padded network's width there)")


def spread_positions(real: int, padded: int) -> torch.Tensor:
    """Padded positions of ``real`` channels spread evenly over ``padded``: ``floor(j * padded / real)``."""
    return torch.div(torch.arange(real) * padded, real, rounding_mode="floor")


class ChannelLayout:
    """Where each narrow "space" (a kind of channel axis) sits inside its padded axis.

    Spaces: ``c`` (the 320 stream), ``c2`` (the 640-wide concat [h, skip] of the output blocks),
    ``e`` (time-MLP hidden, 1280), ``f`` (GEGLU inner, 1280), ``f2`` (GEGLU projection [x, gate],
    2560), ``t`` (timestep sinusoid, 320, all real), ``ctx`` (768 context, all real), ``lat``
    (4 latent channels, all real).
    """

    def __init__(self, cfg: NanoUNetConfig):
        p = cfg.padded_channels
        pos_c = spread_positions(cfg.real_channels, p)
        pos_e = spread_positions(cfg.time_embed_real, 4 * p)
        pos_f = spread_positions(cfg.ff_inner_real, 4 * p)
        self.spaces: dict[str, tuple[torch.Tensor, int]] = {
            "c": (pos_c, p),
            "c2": (torch.cat([pos_c, pos_c + p]), 2 * p),
            "e": (pos_e, 4 * p),
            "f": (pos_f, 4 * p),
            "f2": (torch.cat([pos_f, pos_f + 4 * p]), 8 * p),
            "t": (torch.arange(p), p),
            "ctx": (torch.arange(cfg.context_dim), cfg.context_dim),
            "lat": (torch.arange(cfg.in_channels), cfg.in_channels),
            "lat_out": (torch.arange(cfg.out_channels), cfg.out_channels),
        }
        heads_of_channels = pos_c // cfg.padded_head_dim
        expected = torch.arange(cfg.real_channels) // (cfg.real_channels // cfg.num_heads)
        if not torch.equal(heads_of_channels, expected):  # guaranteed by spread_positions; guard anyway
            raise ValueError(f"real_channels={cfg.real_channels}: real channels do not split evenly over heads")

    def positions(self, space: str) -> torch.Tensor:
        return self.spaces[space][0]

    def real(self, space: str) -> int:
        return len(self.spaces[space][0])

    def padded(self, space: str) -> int:
        return self.spaces[space][1]


# --------------------------------------------------------------------------------------------
# Layers that know which spaces their axes live in (for padding / unpadding the weights).
# --------------------------------------------------------------------------------------------


class _Padded:
    """Mixin: ``param_spaces`` maps a parameter name to the space of each of its axes (None = as is)."""

    param_spaces: dict[str, tuple[str | None, ...]]


class NarrowLinear(nn.Linear, _Padded):
    def __init__(self, layout: ChannelLayout, in_space: str, out_space: str, bias: bool = True):
        super().__init__(layout.real(in_space), layout.real(out_space), bias=bias)
        self.param_spaces = {"weight": (out_space, in_space)}
        if bias:
            self.param_spaces["bias"] = (out_space,)


class NarrowConv2d(nn.Conv2d, _Padded):
    def __init__(self, layout: ChannelLayout, in_space: str, out_space: str, kernel_size: int):
        super().__init__(layout.real(in_space), layout.real(out_space), kernel_size, padding=kernel_size // 2)
        self.param_spaces = {"weight": (out_space, in_space, None, None), "bias": (out_space,)}


class PaddedGroupNorm(nn.Module, _Padded):
    """GroupNorm(32) of the padded network, computed on the real channels only.

    x: [B, C_real, H, W] -> [B, C_real, H, W]. Statistics are those of the padded group
    (``g = C_pad / 32`` channels, zeros included); see the module docstring for the formula.
    """

    def __init__(self, layout: ChannelLayout, space: str, eps: float):
        super().__init__()
        positions, padded = layout.positions(space), layout.padded(space)
        real = len(positions)
        self.eps = eps
        self.group_size = padded // GROUPNORM_GROUPS
        self.weight = nn.Parameter(torch.ones(real))
        self.bias = nn.Parameter(torch.zeros(real))
        self.param_spaces = {"weight": (space,), "bias": (space,)}
        group_of = positions // self.group_size  # [C_real], nondecreasing
        counts = torch.bincount(group_of, minlength=GROUPNORM_GROUPS)
        # Uniform layout (every group holds the same number of consecutive real channels):
        # a reshape to [B, 32, k, H, W] is enough. Otherwise gather per-group sums by index.
        self.uniform = bool((counts == counts[0]).all() and counts[0] > 0)
        self.register_buffer("group_of", group_of, persistent=False)
        self.register_buffer("zeros_per_group", (self.group_size - counts).float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        count = self.group_size * h * w  # elements of one padded group
        if self.uniform:
            xg = x.reshape(b, GROUPNORM_GROUPS, -1)  # [B, G, k*H*W]
            mean = xg.sum(-1, keepdim=True) / count
            d = xg - mean
            zeros = self.zeros_per_group[0] * h * w
            var = ((d * d).sum(-1, keepdim=True) + zeros * mean * mean) / count
            y = (d * torch.rsqrt(var + self.eps)).reshape(b, c, h, w)
        else:
            sums = x.sum((2, 3))  # [B, C]
            mean = x.new_zeros(b, GROUPNORM_GROUPS).index_add_(1, self.group_of, sums) / count  # [B, G]
            d = x - mean[:, self.group_of, None, None]
            sq = x.new_zeros(b, GROUPNORM_GROUPS).index_add_(1, self.group_of, (d * d).sum((2, 3)))
            var = (sq + self.zeros_per_group * h * w * mean * mean) / count  # [B, G]
            y = d * torch.rsqrt(var + self.eps)[:, self.group_of, None, None]
        return y * self.weight[:, None, None] + self.bias[:, None, None]


class PaddedLayerNorm(nn.Module, _Padded):
    """LayerNorm over the padded width, computed on the real channels: x [B, T, C_real]."""

    def __init__(self, layout: ChannelLayout, space: str, eps: float = LAYERNORM_EPS):
        super().__init__()
        real, self.padded_width = layout.real(space), layout.padded(space)
        self.eps = eps
        self.zeros = self.padded_width - real
        self.weight = nn.Parameter(torch.ones(real))
        self.bias = nn.Parameter(torch.zeros(real))
        self.param_spaces = {"weight": (space,), "bias": (space,)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.sum(-1, keepdim=True) / self.padded_width
        d = x - mean
        var = ((d * d).sum(-1, keepdim=True) + self.zeros * mean * mean) / self.padded_width
        return d * torch.rsqrt(var + self.eps) * self.weight + self.bias


# --------------------------------------------------------------------------------------------
# Blocks (module names = ComfyUI's, so state-dict keys are the LDM keys).
# --------------------------------------------------------------------------------------------


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding as in ComfyUI / LDM: t [B] -> [B, dim] = [cos(t f), sin(t f)]."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ResBlock(nn.Module):
    """h = out_layers(in_layers(x) + emb_layers(emb)); return skip(x) + h. x [B, Cin, H, W]."""

    def __init__(self, layout: ChannelLayout, in_space: str = "c"):
        super().__init__()
        self.in_layers = nn.Sequential(
            PaddedGroupNorm(layout, in_space, RESBLOCK_NORM_EPS), nn.SiLU(), NarrowConv2d(layout, in_space, "c", 3)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), NarrowLinear(layout, "e", "c"))
        self.out_layers = nn.Sequential(
            PaddedGroupNorm(layout, "c", RESBLOCK_NORM_EPS),
            nn.SiLU(),
            nn.Dropout(0.0),
            NarrowConv2d(layout, "c", "c", 3),
        )
        self.skip_connection = nn.Identity() if in_space == "c" else NarrowConv2d(layout, in_space, "c", 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention with the padded head dim's softmax scale. x [B, T, C] -> [B, T, C]."""

    def __init__(self, layout: ChannelLayout, cfg: NanoUNetConfig, context_space: str):
        super().__init__()
        self.heads = cfg.num_heads
        self.scale = 1.0 / math.sqrt(cfg.padded_head_dim)
        self.to_q = NarrowLinear(layout, "c", "c", bias=False)
        self.to_k = NarrowLinear(layout, context_space, "c", bias=False)
        self.to_v = NarrowLinear(layout, context_space, "c", bias=False)
        self.to_out = nn.Sequential(NarrowLinear(layout, "c", "c"), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b = x.shape[0]
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))  # [B, heads, T, d]
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.to_out(out.transpose(1, 2).reshape(b, x.shape[1], -1))


class GEGLU(nn.Module):
    def __init__(self, layout: ChannelLayout):
        super().__init__()
        self.proj = NarrowLinear(layout, "c", "f2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, layout: ChannelLayout):
        super().__init__()
        self.net = nn.Sequential(GEGLU(layout), nn.Dropout(0.0), NarrowLinear(layout, "f", "c"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the [B, 77, 768] context, GEGLU feed-forward (pre-norm)."""

    def __init__(self, layout: ChannelLayout, cfg: NanoUNetConfig):
        super().__init__()
        self.attn1 = CrossAttention(layout, cfg, context_space="c")
        self.ff = FeedForward(layout)
        self.attn2 = CrossAttention(layout, cfg, context_space="ctx")
        self.norm1 = PaddedLayerNorm(layout, "c")
        self.norm2 = PaddedLayerNorm(layout, "c")
        self.norm3 = PaddedLayerNorm(layout, "c")

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 conv in, transformer block over the H*W tokens, 1x1 conv out, residual."""

    def __init__(self, layout: ChannelLayout, cfg: NanoUNetConfig):
        super().__init__()
        self.norm = PaddedGroupNorm(layout, "c", TRANSFORMER_NORM_EPS)
        self.proj_in = NarrowConv2d(layout, "c", "c", 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(layout, cfg)])
        self.proj_out = NarrowConv2d(layout, "c", "c", 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # [B, H*W, C]
        for block in self.transformer_blocks:
            t = block(t, context)
        return self.proj_out(t.transpose(1, 2).reshape(b, c, h, w)) + x


class TimestepEmbedSequential(nn.Sequential):
    """Runs its children, passing the time embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class NanoUNet(nn.Module):
    """eps = NanoUNet(x [B, 4, H, W], timesteps [B], context [B, T, 768]) -> [B, 4, H, W].

    State-dict keys are ComfyUI's LDM U-Net keys (without ``model.diffusion_model.``); shapes are
    the narrow ones. ``to_padded_state_dict()`` gives the 320-wide ComfyUI state dict.
    """

    def __init__(self, cfg: NanoUNetConfig | None = None, **overrides):
        super().__init__()
        cfg = dataclasses.replace(cfg or NanoUNetConfig(), **overrides)
        cfg.validate()
        self.config = cfg
        self.layout = layout = ChannelLayout(cfg)
        self.time_embed = nn.Sequential(NarrowLinear(layout, "t", "e"), nn.SiLU(), NarrowLinear(layout, "e", "e"))
        self.input_blocks = nn.ModuleList(
            [
                TimestepEmbedSequential(NarrowConv2d(layout, "lat", "c", 3)),
                TimestepEmbedSequential(ResBlock(layout), SpatialTransformer(layout, cfg)),
            ]
        )
        self.middle_block = TimestepEmbedSequential(ResBlock(layout), SpatialTransformer(layout, cfg), ResBlock(layout))
        self.output_blocks = nn.ModuleList(
            [TimestepEmbedSequential(ResBlock(layout, "c2"), SpatialTransformer(layout, cfg)) for _ in range(2)]
        )
        self.out = nn.Sequential(
            PaddedGroupNorm(layout, "c", RESBLOCK_NORM_EPS), nn.SiLU(), NarrowConv2d(layout, "c", "lat_out", 3)
        )
        self.reset_parameters()

    def reset_parameters(self, zero_init_residual: bool = True) -> None:
        """PyTorch default init at the narrow width; zero the last layer of each residual branch
        and the output conv (as LDM's ``zero_module``) so a fresh network starts near identity."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.reset_parameters()
            elif isinstance(module, (PaddedGroupNorm, PaddedLayerNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            zeroed = [self.out[2]]
            for module in self.modules():
                if isinstance(module, ResBlock):
                    zeroed.append(module.out_layers[3])
                elif isinstance(module, SpatialTransformer):
                    zeroed.append(module.proj_out)
            for layer in zeroed:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor) -> torch.Tensor:
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:  # one timestep for the whole batch
            timesteps = timesteps.expand(x.shape[0])
        batch, cfg = x.shape[0], self.config
        if timesteps.shape != (batch,) or context.shape[0] != batch or context.shape[-1] != cfg.context_dim:
            raise ValueError(
                f"NanoUNet expects x [B, {cfg.in_channels}, H, W], timesteps [B] and "
                f"context [B, T, {cfg.context_dim}]; "
                f"got {list(x.shape)}, {list(timesteps.shape)}, {list(context.shape)}"
            )
        emb = self.time_embed(timestep_embedding(timesteps, self.config.padded_channels).to(x.dtype))  # [B, E]
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)

    # ---------------------------------------------------------------------------- padding

    def _padded_params(self):
        """Yields (state-dict key, narrow tensor, axis spaces) for every parameter."""
        for module_name, module in self.named_modules():
            spaces = getattr(module, "param_spaces", None)
            if spaces is None:
                continue
            for param_name, axis_spaces in spaces.items():
                key = f"{module_name}.{param_name}" if module_name else param_name
                yield key, getattr(module, param_name), axis_spaces

    def _index(self, axis_spaces) -> tuple:
        """Advanced index selecting the real entries of a padded tensor (broadcast over axes)."""
        spaced = [s for s in axis_spaces if s is not None]
        index = []
        for i, space in enumerate(spaced):
            shape = [1] * len(spaced)
            shape[i] = -1
            index.append(self.layout.positions(space).reshape(shape))
        return tuple(index)

    def padded_shape(self, tensor: torch.Tensor, axis_spaces) -> list[int]:
        return [self.layout.padded(s) if s is not None else n for s, n in zip(axis_spaces, tensor.shape)]

    @torch.no_grad()
    def to_padded_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The 320-wide ComfyUI state dict: narrow weights at their positions, zeros elsewhere."""
        out = {}
        for key, tensor, axis_spaces in self._padded_params():
            padded = tensor.new_zeros(self.padded_shape(tensor, axis_spaces))
            padded[self._index(axis_spaces)] = tensor
            out[key] = padded if dtype is None else padded.to(dtype)
        return out

    @torch.no_grad()
    def load_padded_state_dict(self, padded_sd: Mapping[str, torch.Tensor], atol: float = 0.0) -> "NanoUNet":
        """Loads a 320-wide state dict (e.g. to resume from a shipped checkpoint).

        Raises ValueError when a key is missing, a shape differs, or an entry outside the real
        positions exceeds ``atol`` in magnitude (then the narrow network would not be equivalent).
        """
        expected = {key for key, _, _ in self._padded_params()}
        missing, unexpected = expected - set(padded_sd), set(padded_sd) - expected
        if missing or unexpected:
            raise ValueError(
                f"padded U-Net state dict does not match NanoUNet: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}; pass the U-Net keys without 'model.diffusion_model.'"
            )
        for key, tensor, axis_spaces in self._padded_params():
            padded = padded_sd[key]
            shape = self.padded_shape(tensor, axis_spaces)
            if list(padded.shape) != shape:
                raise ValueError(f"{key}: padded shape {list(padded.shape)} != expected {shape} for {self.config}")
            index = self._index(axis_spaces)
            rest = padded.detach().to(torch.float32).clone()
            rest[index] = 0
            worst = rest.abs().max().item() if rest.numel() else 0.0
            if worst > atol:
                raise ValueError(
                    f"{key}: padded entries outside the {self.config.real_channels} real channels are non-zero "
                    f"(max |w| = {worst:.3g}); this checkpoint was not made by zero-padding a narrow NanoUNet "
                    f"with this config"
                )
            tensor.copy_(padded[index].to(tensor.dtype))
        return self

    @classmethod
    def from_padded_state_dict(cls, padded_sd: Mapping[str, torch.Tensor], cfg: NanoUNetConfig | None = None,
                               **overrides) -> "NanoUNet":
        """Builds a narrow network (config ``cfg`` + overrides) and loads a padded state dict into it."""
        model = cls(cfg, **overrides)
        return model.load_padded_state_dict(padded_sd)


def comfy_unet_config() -> dict:
    """kwargs of ComfyUI's ``UNetModel`` for the padded network (what its detector derives)."""
    return dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, channel_mult=[1], num_res_blocks=[1],
        num_heads=8, use_spatial_transformer=True, transformer_depth=[1], transformer_depth_output=[1, 1],
        transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False, legacy=False,
    )
