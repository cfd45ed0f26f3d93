"""Model configuration: one dataclass per part of the paper's Figure 2, composed by `KosmosGConfig`.

Official numbers are the defaults ("kosmosg_xl" arch + runapp.sh flags; "spec section N" below and in
other modules: the official file behind each is named in docs/sources.md). Every constant of the model
is written here once; modules read it from here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

# fairseq Dictionary layout of the official `dict.txt` vocabulary (spec section 5).
FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3, in fairseq's Dictionary order, before dict.txt
BOS_ID = 0  # <s>
PAD_ID = 1  # <pad>
EOS_ID = 2  # </s>
UNK_ID = 3  # <unk>
ADDED_SYMBOLS = ("<mask>", "</doc>", "<image>", "</image>", "</chunk>", "</line>")  # appended after dict.txt
IMAGE_PLACEHOLDER = "<i>"  # what users type in a prompt for "an image goes here"
# `<i>`, or `<i:W>` with W that image's weight (this pack's addition). Whatever stands between `<i:` and `>` is
# read as the weight, so a typo (`<i:O.8>`) is refused by name instead of reaching the model as text. For plain
# `<i>` it finds what `str.count` finds (non-overlapping, left to right), as the official assert counts.
# Mirrored in web/js/kosmosg_prompt.js (PLACEHOLDER_PATTERN).
PLACEHOLDER_PATTERN = re.compile(r"<i(?::([^<>]*))?>")
# An image weight scales the image's features: 1.0 = the official model, 0 = the features removed. Above
# MAX_IMAGE_WEIGHT (or below 0) the conditioning leaves anything SD1.5 was trained on.
MAX_IMAGE_WEIGHT = 10.0

# CLIP image normalisation (open_clip / OpenAI constants), spec section 3.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SD15_CONTEXT_TOKENS = 77  # SD1.5 text-encoder sequence length = aligner queries
SD15_CONTEXT_DIM = 768  # SD1.5 cross-attention width
SD15_LATENT_SCALE = 0.18215  # the SD1.5 U-Net sees VAE latents x this (comfy.latent_formats.SD15.scale_factor)
NANO_SD15_FORMAT = "kosmosg-nano-sd15"  # metadata "format" of the pack's nano image model (train/nano/sd15_format.py)
NANO_IMAGE_SIZE = 64  # pixels: the nano world's scenes (train/nano/world.py), what the nano models are trained at
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # dtypes the core computes and stores in (devices.DTYPES)
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}  # ComfyUI's, torch's
CPU_KERNELS = ("onednn", "few-row")  # what a cpu_linear.PackedLinear runs; "auto" resolves to one of them
SD15_CONFIG_DIR = Path(__file__).parent / "sd15_config"  # SD1.5's component configs (no weights), for diffusers
ALIGNER_FIRST_POSITION = 2  # the aligner's learned positions start at row 2 (fairseq: padding index 1, + 1)
# Sampling of the official demo (spec section 7): scheduler (diffusers class per CLI name), steps, guidance
SCHEDULERS = {"dpm": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler", "pndm": "PNDMScheduler"}
# Settings over the model's scheduler config that keep each scheduler as the official code ran it (diffusers
# 0.21.4). Its DPM-Solver ends with a step to the last timestep's noise level (sigma_min ~0.03);
# diffusers 0.26 on default to a first-order step to noise 0 (final_sigmas_type "zero"): a different picture
# (tests/test_official_sampling.py). DDIM and PNDM are unchanged since 0.21.4.
SCHEDULER_SETTINGS = {"dpm": {"final_sigmas_type": "sigma_min"}}
# diffusers' DPM-Solver (lower_order_final, on by default and in 0.21.4) makes its last step first-order when it
# runs fewer steps than this; from this many on, every step after the first is second-order
DPM_SOLVER_FIRST_ORDER_FINAL_BELOW = 15
# Where each picture's starting noise comes from: "per-image" (image k from seed + k, drawn on the CPU: the same
# noise on any device and in any batch) or "official" (the official demo: torch.manual_seed(seed), then one draw
# of all pictures' noise on the sampling device in its dtype, diffusers 0.21.4's randn_tensor without a generator)
NOISE_MODES = ("per-image", "official")
# Bounds on what a flag or a PNG's record (`generate --like`) may ask of `generate`: pictures per run (sampled as
# one batch), steps (SD1.5 has 1000 noise levels), a side in pixels
MAX_NUM_IMAGES, MAX_STEPS, MAX_IMAGE_SIDE = 1024, 1000, 8192
DEFAULT_SCHEDULER, DEFAULT_STEPS, DEFAULT_GUIDANCE_SCALE = "dpm", 50, 6.0
# The PNG text chunk in which `generate` records each picture's settings (JSON: prompt, images, seed, steps...)
PNG_SETTINGS_KEY = "kosmosg"
# The default size limit of a disk cache of encodings (`disk_cache.DiskCache`): an image's vision features are
# 0.5 MiB in float32 at the official size, an encoding 0.23 MiB, so 1 GiB holds ~2000 images' features
DISK_CACHE_MAX_BYTES = 2**30

# Sanity limits for sizes read from a file's config (official sizes are far below): a damaged or hostile
# config could otherwise ask for 100000 layers (minutes of model building before the tensor check) or a
# width whose storage size overflows.
MAX_LAYERS = 1024
MAX_SIZE = 2**24


@dataclass
class VisionConfig:
    """CLIP ViT (open_clip layout, no projection head). Official: ViT-L/14 at 224 px."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-5
    # stage 3 trains only the last block and ln_post (official --no-freeze-layer resblocks.23)
    trainable_last_blocks: int = 1

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:  # patches + CLS
        return self.num_patches + 1


@dataclass
class ConnectorConfig:
    """Perceiver-style resampler (official `XConnector`): 64 latent queries per image."""

    num_queries: int = 64
    heads: int = 32  # width of the MLLM / 64
    attention_dropout: float = 0.0  # official training 0.1 (its attention takes the MLLM's attention_dropout)


@dataclass
class DecoderConfig:
    """The MLLM: a torchscale-style pre-LN decoder with subLN and absolute sinusoidal positions."""

    vocab_size: int = 64007  # 4 fairseq specials + 63997 dict.txt pieces + 6 added symbols
    width: int = 2048
    layers: int = 24
    heads: int = 32
    ffn_width: int = 8192
    max_positions: int = 2048  # official tokens-per-sample: the longest sequence it was trained on (a limit;
    # the sinusoidal positions are computed, not stored)
    layer_norm_eps: float = 1e-5
    scale_embedding: bool = True  # official no_scale_embedding=False: embeddings * sqrt(width)
    dropout: float = 0.0  # embeddings and residual branches (official training 0.1; inference 0)
    # attention probabilities (official training: none applied: its self-attention runs through xformers'
    # memory_efficient_attention under --flash-attention, which takes no dropout, though 0.1 is configured)
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0  # after the FFN's GELU (torchscale's activation_dropout; official 0)
    gradient_checkpointing: bool = False


@dataclass
class AlignerConfig:
    """AlignerNet: encoder over MLLM states + 77-query decoder -> SD1.5 context [B, 77, 768]."""

    width: int = SD15_CONTEXT_DIM  # = SD1.5 context width; torchscale EncoderDecoderConfig defaults (spec section 6)
    heads: int = 12
    ffn_width: int = 3072
    encoder_layers: int = 12
    decoder_layers: int = 12
    num_queries: int = SD15_CONTEXT_TOKENS
    max_positions: int = 32768  # official learned position table size (rows before ALIGNER_FIRST_POSITION unused)
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0
    # Stage-2 training only: the reconstruction branch (decoder_query + decoder + decoder_proj).
    with_reconstruction: bool = False
    reconstruction_layers: int = 12


# every dropout of the model, (part, field): on in training only
DROPOUT_FIELDS = (("decoder", "dropout"), ("decoder", "attention_dropout"), ("decoder", "activation_dropout"),
                  ("connector", "attention_dropout"), ("aligner", "dropout"))
# Fields added after checkpoint format 1, written only when they differ from their default (training switches; 0 in
# every exported file), so a file exported now stays readable by earlier versions of the pack, which refuse a field
# they do not know.
FIELDS_WRITTEN_WHEN_SET = {"decoder": ("activation_dropout",), "connector": ("attention_dropout",)}


@dataclass
class KosmosGConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    aligner: AlignerConfig = field(default_factory=AlignerConfig)
    image_token_slots: int = 64  # feature slots per image in the token sequence (= connector queries)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for part in (self.vision, self.connector, self.decoder, self.aligner):
            _check_field_values(part)
        _check_field_values(self)
        d, v, a = self.decoder, self.vision, self.aligner
        checks = [
            (d.width % d.heads == 0, f"decoder width {d.width} is not divisible by its {d.heads} heads"),
            (v.width % v.heads == 0, f"vision width {v.width} is not divisible by its {v.heads} heads"),
            (a.width % a.heads == 0, f"aligner width {a.width} is not divisible by its {a.heads} heads"),
            (d.width % self.connector.heads == 0, f"decoder width {d.width} not divisible by connector heads"),
            (1 <= v.width * v.mlp_ratio <= MAX_SIZE,  # the MLP's hidden width, int(width * mlp_ratio)
             f"vision MLP width {v.width} x {v.mlp_ratio:g} is outside 1..{MAX_SIZE}"),
            (v.image_size % v.patch_size == 0, f"image size {v.image_size} not a multiple of patch {v.patch_size}"),
            (self.connector.num_queries == self.image_token_slots,
             f"connector queries {self.connector.num_queries} != image token slots {self.image_token_slots}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Invalid Kosmos-G config: {message}.")

    @property
    def max_prompt_tokens(self) -> int:
        """The longest token sequence (ids incl. <s> and the image slots) the model was trained on and reads: the
        decoder's max_positions (official tokens-per-sample), within the aligner's position table from
        ALIGNER_FIRST_POSITION on. Training keeps to it."""
        return min(self.decoder.max_positions, self.max_readable_tokens)

    @property
    def max_readable_tokens(self) -> int:
        """The longest token sequence the model can read at all: the rows of the aligner's learned position table
        from ALIGNER_FIRST_POSITION on (official: 32766). The decoder's sinusoidal positions are computed for any
        length, and the official code encodes prompts past its trained length (the pipeline warns)."""
        return self.aligner.max_positions - ALIGNER_FIRST_POSITION

    # --- serialisation (stored as JSON in the .safetensors metadata) ---------------------------
    def to_dict(self, complete: bool = False) -> dict:
        """Every field with `complete`; else FIELDS_WRITTEN_WHEN_SET are left out at their default (what files and
        cache keys hold: an exported file stays readable by earlier packs, an earlier key stays the same)."""
        data = dataclasses.asdict(self)
        for part, names in ({} if complete else FIELDS_WRITTEN_WHEN_SET).items():
            for name in names:
                if data[part][name] == getattr(type(getattr(self, part)), name):
                    del data[part][name]
        return data

    def to_json(self, complete: bool = False) -> str:
        return json.dumps(self.to_dict(complete), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "KosmosGConfig":
        def build(klass, values):
            if not isinstance(values, dict):
                raise ValueError(f"Invalid Kosmos-G config: {klass.__name__} is a {type(values).__name__}, expected a "
                                 "JSON object.")
            names = {f.name for f in dataclasses.fields(klass)}
            unknown = set(values) - names
            if unknown:
                raise ValueError(f"Unknown {klass.__name__} fields in the model config: {sorted(unknown)}; it takes "
                                 f"{', '.join(sorted(names))}.")
            return klass(**values)

        if not isinstance(data, dict):  # e.g. a damaged file whose config reads as a list or a number
            raise ValueError(f"Invalid Kosmos-G config: it is a {type(data).__name__}, expected a JSON object.")
        parts = [f.name for f in dataclasses.fields(cls)]
        unknown = set(data) - set(parts)
        if unknown:  # e.g. a part's field written at the top (scale_embedding belongs in decoder)
            raise ValueError(f"Unknown fields at the top of the model config: {sorted(unknown)}; it takes "
                             f"{', '.join(parts)}, each part's fields inside it.")
        return cls(
            vision=build(VisionConfig, data.get("vision", {})),
            connector=build(ConnectorConfig, data.get("connector", {})),
            decoder=build(DecoderConfig, data.get("decoder", {})),
            aligner=build(AlignerConfig, data.get("aligner", {})),
            image_token_slots=data.get("image_token_slots", cls.image_token_slots),
        )

    @classmethod
    def from_json(cls, text: str) -> "KosmosGConfig":
        try:
            data = json.loads(text)
        except RecursionError:  # a hostile file's nesting: a ValueError as any bad config
            raise ValueError("Invalid Kosmos-G config: its JSON nests too deep.") from None
        return cls.from_dict(data)

    def for_inference(self) -> "KosmosGConfig":
        """A copy with the training-only switches off: dropout, gradient checkpointing and the
        stage-2 reconstruction branch. The pack's .safetensors always records this form."""
        cfg = KosmosGConfig.from_dict(self.to_dict())
        for part, name in DROPOUT_FIELDS:
            setattr(getattr(cfg, part), name, 0.0)
        cfg.decoder.gradient_checkpointing = False
        cfg.aligner.with_reconstruction = False
        return cfg

    # --- named sizes ---------------------------------------------------------------------------
    @classmethod
    def official(cls) -> "KosmosGConfig":
        """checkpoint_final.pt: ViT-L/14 + 64-query resampler + 24x2048 MLLM + 12+12x768 aligner."""
        return cls()

    @classmethod
    def tiny(cls, vocab_size: int = 99, context_dim: int = 32) -> "KosmosGConfig":
        """Test-sized model (transformers-tester sizes): every code path, milliseconds per forward.

        `context_dim` != 768 exists only for test fixtures (decisions.md)."""
        return cls(
            vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2),
            connector=ConnectorConfig(num_queries=4, heads=2),
            decoder=DecoderConfig(vocab_size=vocab_size, width=64, layers=2, heads=2, ffn_width=128, max_positions=256),
            aligner=AlignerConfig(width=context_dim, heads=2, ffn_width=64, encoder_layers=2, decoder_layers=2,
                                  max_positions=512, reconstruction_layers=2),
            image_token_slots=4,
        )


def _check_field_values(part) -> None:
    """Each field holds its default's type: a whole number in 1..MAX_SIZE (layer counts up to MAX_LAYERS,
    trainable_last_blocks from 0), a finite non-negative number (epsilons and ratios above 0, dropouts below
    1), a true/false."""
    for f in dataclasses.fields(part):
        value, default = getattr(part, f.name), f.default
        where = f"Invalid Kosmos-G config: {type(part).__name__}.{f.name} = {value!r}"
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{where}: expected true or false.")
        elif isinstance(default, int):
            low = 0 if f.name == "trainable_last_blocks" else 1
            high = MAX_LAYERS if f.name.endswith("layers") or f.name == "trainable_last_blocks" else MAX_SIZE
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{where}: expected a whole number from {low} to {high}.")
        elif isinstance(default, float):
            positive = f.name.endswith(("eps", "ratio"))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (positive and value == 0) or ("dropout" in f.name and value >= 1):
                limits = "above 0" if positive else "from 0 to below 1" if "dropout" in f.name else "from 0"
                raise ValueError(f"{where}: expected a finite number {limits}.")
