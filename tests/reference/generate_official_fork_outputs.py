"""Generate tests/reference/official_fork_outputs.safetensors from the official fork's own source.

Run by hand, never in CI (it needs the mirror of xichenpan/Kosmos-G, which tests do not):

    OMP_NUM_THREADS=1 python tests/reference/generate_official_fork_outputs.py [--mirror DIR] [--check]

The official code is read straight from the mirror with `git show HEAD:<path>` and executed in memory;
nothing of it is written into this repository. Only its outputs are stored: tiny seeded cases (widths
of 64, two layers) that tests/test_reference_vs_official_source.py rebuilds with the PyPI-torchscale
reference (tests/reference/official_reference.py) and compares against.

Stored per case: the inputs (tensors), the outputs (tensors) and, in the metadata, the case's sizes and
seeds, the official module's state-dict key set and a SHA-256 fingerprint of its seeded parameters, so
the test can prove it rebuilt the very same weights. The metadata also records the mirror commit, the git
blob SHA-1 of every official file executed, and this script's version.

How the fork's modules are executed. They import apex, xformers, fairscale, diffusers' LoRA layer and
fairseq at module level; none of them is reached on the paths generated here (LayerNorm without apex, no
flash attention with a mask, no checkpointing, no LoRA). Their imports resolve to:
- `apex.normalization.FusedLayerNorm` -> `torch.nn.LayerNorm` (same function: affine, eps 1e-5; apex only
  fuses the kernel);
- `xformers.ops.*`, `diffusers...LoRALinearLayer`, the fork's `SoPE`: stand-ins that raise if used;
- `fairseq.utils.make_positions` -> `_make_positions` below (fairseq's documented formula: non-pad tokens
  count from padding_idx + 1, pads keep padding_idx), written here, not taken from the reference;
- `torchscale.component.{multiway_network, multihead_attention, feedforward_network}` -> the fork's files;
- the remaining torchscale helpers (drop-path, relative-position bias, MoE, init utils) -> PyPI torchscale
  0.3.0's modules, never instantiated with the settings used (`reference._torchscale` makes PyPI
  torchscale importable without fairscale / timm).

Weights: every parameter is filled from its own generator, seeded by (case seed, parameter name), so the
values do not depend on module construction order. See `seeded_weights_` (the test has the same recipe,
checked through the stored fingerprints).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import types
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for `reference._torchscale`

from reference import _torchscale  # noqa: E402,F401  (PyPI torchscale importable without fairscale / timm)
from reference.in_memory_module import module_from_source  # noqa: E402
from reference.seeding import seeded_randn, seeded_weights_, weights_fingerprint  # noqa: E402

GENERATOR_VERSION = "1"
CHECK_ATOL = 5e-6  # --check: half the tolerance of tests/test_reference_vs_official_source.py (1e-5)
DEFAULT_MIRROR = Path("/work/.mirror/xichenpan+Kosmos-G/repo")
OUTPUT = Path(__file__).with_name("official_fork_outputs.safetensors")
SOURCE_REPOSITORY = "https://github.com/xichenpan/Kosmos-G"

# module name in the namespace returned by load_fork -> path in the official repository
FORK_FILES = {
    "multiway_network": "torchscale/torchscale/component/multiway_network.py",
    "multihead_attention": "torchscale/torchscale/component/multihead_attention.py",
    "feedforward_network": "torchscale/torchscale/component/feedforward_network.py",
    "embedding": "torchscale/torchscale/component/embedding.py",
    "config": "torchscale/torchscale/architecture/config.py",
    "encoder": "torchscale/torchscale/architecture/encoder.py",
    "decoder": "torchscale/torchscale/architecture/decoder.py",
    "sinusoidal_positional_embedding": "fairseq/fairseq/modules/sinusoidal_positional_embedding.py",
}

# Fields of the aligner's EncoderDecoderConfig() that the reference's aligner config must reproduce.
ALIGNER_CONFIG_FIELDS = [
    "encoder_embed_dim", "encoder_attention_heads", "encoder_ffn_embed_dim", "encoder_layers",
    "encoder_normalize_before", "decoder_embed_dim", "decoder_attention_heads", "decoder_ffn_embed_dim",
    "decoder_layers", "decoder_normalize_before", "activation_fn", "dropout", "attention_dropout",
    "activation_dropout", "drop_path_rate", "no_scale_embedding", "layernorm_embedding", "deepnorm", "subln",
    "multiway", "rel_pos_buckets", "max_rel_pos", "moe_freq",
]


# ------------------------------------------------------------------------------------------------
# Seeded weights and inputs (same recipe in tests/test_reference_vs_official_source.py)
# ------------------------------------------------------------------------------------------------
# ------------------------------------------------------------------------------------------------
# Reading and executing the fork's files
# ------------------------------------------------------------------------------------------------
def _git(mirror: Path, *args: str) -> bytes:
    return subprocess.run(["git", "-C", str(mirror), *args], check=True, capture_output=True).stdout


def read_fork_sources(mirror: Path) -> tuple[str, dict[str, str], dict[str, dict]]:
    """-> (commit, {short name: source text}, {repo path: {"git_blob_sha1": ...}})."""
    if not (mirror / "HEAD").exists():
        raise SystemExit(f"--mirror {mirror}: not a bare git dir of xichenpan/Kosmos-G (fetch it first)")
    commit = _git(mirror, "rev-parse", "HEAD").decode().strip()
    sources, blobs = {}, {}
    for short, path in FORK_FILES.items():
        data = _git(mirror, "show", f"{commit}:{path}")
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        if blob != _git(mirror, "rev-parse", f"{commit}:{path}").decode().strip():
            raise RuntimeError(f"{path}: bytes read do not hash to the mirror's blob")
        sources[short] = data.decode("utf-8")
        blobs[path] = {"git_blob_sha1": blob}
    return commit, sources, blobs


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(f"official fork stand-in: {what} must not be reached by the generator")
    return refuse


class _RefusedClass:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"official fork stand-in: {type(self).__name__} must not be constructed by the generator")


class LoRALinearLayer(_RefusedClass):
    pass


class SoPE(_RefusedClass):
    pass


class LowerTriangularMask(_RefusedClass):
    pass


def _make_positions(tokens: torch.Tensor, padding_idx: int, onnx_trace: bool = False) -> torch.Tensor:
    """fairseq.utils.make_positions: non-pad tokens count padding_idx + 1, + 2, ...; pads keep padding_idx."""
    not_pad = tokens.ne(padding_idx).long()
    return torch.cumsum(not_pad, dim=1) * not_pad + padding_idx


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _stand_ins() -> dict[str, types.ModuleType]:
    apex = _module("apex")
    apex.normalization = _module("apex.normalization", FusedLayerNorm=torch.nn.LayerNorm)
    xformers = _module("xformers")
    xformers.ops = _module("xformers.ops", memory_efficient_attention=_refuse("xformers attention"),
                           LowerTriangularMask=LowerTriangularMask, MemoryEfficientAttentionCutlassOp=object())
    fairseq = _module("fairseq")
    fairseq.utils = _module("fairseq.utils", make_positions=_make_positions)
    return {
        "apex": apex, "apex.normalization": apex.normalization,
        "xformers": xformers, "xformers.ops": xformers.ops,
        "fairseq": fairseq, "fairseq.utils": fairseq.utils,
        "diffusers.models.attention_processor": _module("diffusers.models.attention_processor",
                                                        LoRALinearLayer=LoRALinearLayer),
        "torchscale.component.sope_relative_position": _module("torchscale.component.sope_relative_position",
                                                               SoPE=SoPE),
    }


@contextmanager
def _modules_replaced(replacements: dict[str, types.ModuleType]):
    saved = {name: sys.modules.get(name) for name in replacements}
    sys.modules.update(replacements)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def load_fork(sources: dict[str, str]) -> types.SimpleNamespace:
    """Execute the fork's files in memory -> namespace of their modules (keys of FORK_FILES)."""
    def run(short: str, package: str) -> types.ModuleType:
        # relative imports (`.multiway_network`) resolve under `package`
        return module_from_source(sources[short], f"<official {FORK_FILES[short]}>", f"official_fork.{short}", package)

    loaded = {}
    with _modules_replaced(_stand_ins()):
        loaded["multiway_network"] = run("multiway_network", "torchscale.component")
        with _modules_replaced({"torchscale.component.multiway_network": loaded["multiway_network"]}):
            loaded["multihead_attention"] = run("multihead_attention", "torchscale.component")
            loaded["feedforward_network"] = run("feedforward_network", "torchscale.component")
            loaded["embedding"] = run("embedding", "torchscale.component")
            loaded["config"] = run("config", "torchscale.architecture")
            with _modules_replaced({"torchscale.component.multihead_attention": loaded["multihead_attention"],
                                    "torchscale.component.feedforward_network": loaded["feedforward_network"]}):
                loaded["encoder"] = run("encoder", "torchscale.architecture")
                loaded["decoder"] = run("decoder", "torchscale.architecture")
        loaded["sinusoidal_positional_embedding"] = run("sinusoidal_positional_embedding", "fairseq.modules")
    return types.SimpleNamespace(**loaded)


# ------------------------------------------------------------------------------------------------
# Cases (each mirrors one test in tests/test_reference_vs_official_source.py)
# ------------------------------------------------------------------------------------------------
def fork_attention_args(**overrides):
    """The attributes the fork's MultiheadAttention reads from args on these paths."""
    return types.SimpleNamespace(**{"multiway": False, "scale_length": 2048, "flash_attention": False, **overrides})


def _key_padding(batch: int, length: int, padded: dict[int, int]) -> torch.Tensor:
    """[B, T] bool; row b has its last padded[b] positions padded (right padding)."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row, count in padded.items():
        mask[row, length - count:] = True
    return mask


class CaseWriter:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.cases: dict[str, dict] = {}

    def add(self, case: str, spec: dict, module: torch.nn.Module | None = None, **tensors: torch.Tensor):
        if module is not None:
            spec = {**spec, "state_keys": sorted(module.state_dict()), "weights_sha256": weights_fingerprint(module)}
        self.cases[case] = spec
        for name, tensor in tensors.items():
            self.tensors[f"{case}.{name}"] = tensor.detach().contiguous().clone()


def case_self_attention(fork, out: CaseWriter, flash_attention: bool) -> None:
    """subLN self-attention [T, B, C] with key padding; without flash also with LMDecoder's causal float mask."""
    case = "self_attention_flash" if flash_attention else "self_attention"
    spec = dict(T=7, B=3, C=64, H=4, weight_seed=1, x_seed=2, padded={"1": 2}, flash_attention=flash_attention)
    module = fork.multihead_attention.MultiheadAttention(
        fork_attention_args(flash_attention=flash_attention), spec["C"], spec["H"], self_attention=True, subln=True)
    seeded_weights_(module, spec["weight_seed"])
    x = seeded_randn((spec["T"], spec["B"], spec["C"]), spec["x_seed"])
    padding = _key_padding(spec["B"], spec["T"], {1: 2})
    with torch.no_grad():
        attn, attn_weights = module(x, x, x, key_padding_mask=padding, attn_mask=None)
        tensors = dict(x=x, key_padding_mask=padding, out=attn, attn_weights=attn_weights)
        if not flash_attention:  # with a mask, flash_attention would take the xformers branch (CUDA only)
            causal = torch.triu(torch.full((spec["T"], spec["T"]), float("-inf")), 1)
            tensors.update(causal_mask=causal, causal_out=module(x, x, x, attn_mask=causal)[0])
    out.add(case, spec, module, **tensors)


def case_cross_attention(fork, out: CaseWriter) -> None:
    """encoder_attn: built with subln=True by DecoderLayer, but the fork creates no inner LN for it."""
    spec = dict(T=5, S=9, B=2, C=64, H=2, weight_seed=3, q_seed=4, kv_seed=5, padded={"0": 3})
    module = fork.multihead_attention.MultiheadAttention(fork_attention_args(), spec["C"], spec["H"],
                                                         encoder_decoder_attention=True, subln=True)
    assert module.inner_attn_ln is None
    seeded_weights_(module, spec["weight_seed"])
    q = seeded_randn((spec["T"], spec["B"], spec["C"]), spec["q_seed"])
    kv = seeded_randn((spec["S"], spec["B"], spec["C"]), spec["kv_seed"])
    padding = _key_padding(spec["B"], spec["S"], {0: 3})
    with torch.no_grad():
        attn = module(q, kv, kv, key_padding_mask=padding)[0]
    out.add("cross_attention", spec, module, q=q, kv=kv, key_padding_mask=padding, out=attn)


def case_feedforward(fork, out: CaseWriter) -> None:
    spec = dict(C=64, ffn=256, activation="gelu", weight_seed=6, x_seed=7, x_shape=[5, 3, 64])
    module = fork.feedforward_network.FeedForwardNetwork(spec["C"], spec["ffn"], spec["activation"], 0.0, 0.0,
                                                         subln=True)
    seeded_weights_(module, spec["weight_seed"])
    x = seeded_randn(spec["x_shape"], spec["x_seed"])
    with torch.no_grad():
        y = module(x)
    out.add("feedforward", spec, module, x=x, out=y)


SMALL_ENCDEC = dict(encoder_embed_dim=64, encoder_attention_heads=2, encoder_ffn_embed_dim=128, encoder_layers=2,
                    decoder_embed_dim=64, decoder_attention_heads=2, decoder_ffn_embed_dim=128, decoder_layers=2)


def case_encoder_layer(fork, out: CaseWriter) -> None:
    spec = dict(config=SMALL_ENCDEC, depth=0, weight_seed=8, x_seed=9, x_shape=[6, 2, 64], padded={"1": 2})
    module = fork.encoder.EncoderLayer(fork.config.EncoderDecoderConfig(**SMALL_ENCDEC), depth=0,
                                       is_encoder_decoder=True)
    seeded_weights_(module, spec["weight_seed"])
    x = seeded_randn(spec["x_shape"], spec["x_seed"])
    padding = _key_padding(2, 6, {1: 2})
    with torch.no_grad():
        y = module(x, encoder_padding_mask=padding)[0]
    out.add("encoder_layer", spec, module, x=x, encoder_padding_mask=padding, out=y)


def case_decoder_layer(fork, out: CaseWriter) -> None:
    spec = dict(config=SMALL_ENCDEC, depth=0, weight_seed=10, x_seed=11, x_shape=[5, 2, 64], memory_seed=12,
                memory_shape=[8, 2, 64], padded={"1": 3})
    module = fork.decoder.DecoderLayer(fork.config.EncoderDecoderConfig(**SMALL_ENCDEC), depth=0,
                                       is_encoder_decoder=True)
    seeded_weights_(module, spec["weight_seed"])
    x = seeded_randn(spec["x_shape"], spec["x_seed"])
    memory = seeded_randn(spec["memory_shape"], spec["memory_seed"])
    padding = _key_padding(2, 8, {1: 3})
    with torch.no_grad():
        y = module(x, memory, padding, None, self_attn_mask=None, self_attn_padding_mask=None)[0]
    out.add("decoder_layer", spec, module, x=x, memory=memory, encoder_padding_mask=padding, out=y)


def case_aligner(fork, out: CaseWriter) -> None:
    """unilm/models/aligner.py Aligner_encoder, composed from the fork's Encoder / Decoder / PositionalEmbedding."""
    spec = dict(width=64, heads=2, ffn_width=128, encoder_layers=2, decoder_layers=2, mllm_width=96,
                max_positions=40, num_queries=77, weight_seed=13, condition_seed=14, condition_shape=[3, 9, 96],
                padded={"1": 3, "2": 7})
    width = spec["width"]
    cfg = fork.config.EncoderDecoderConfig(
        encoder_embed_dim=width, encoder_attention_heads=spec["heads"], encoder_ffn_embed_dim=spec["ffn_width"],
        encoder_layers=spec["encoder_layers"], decoder_embed_dim=width, decoder_attention_heads=spec["heads"],
        decoder_ffn_embed_dim=spec["ffn_width"], decoder_layers=spec["decoder_layers"])
    official = torch.nn.Module()
    official.encoder_proj = fork.encoder.Encoder(
        cfg, embed_tokens=torch.nn.Linear(spec["mllm_width"], width),
        embed_positions=fork.embedding.PositionalEmbedding(spec["max_positions"], width), is_encoder_decoder=True)
    official.encoder_query = torch.nn.Parameter(torch.zeros(spec["num_queries"], width))
    official.encoder = fork.decoder.Decoder(cfg, is_encoder_decoder=True, causal_mask=False)
    seeded_weights_(official, spec["weight_seed"])
    condition = seeded_randn(spec["condition_shape"], spec["condition_seed"])
    padding = _key_padding(3, 9, {1: 3, 2: 7})
    with torch.no_grad():  # Aligner_encoder.forward, as unilm/models/aligner.py writes it
        memory = official.encoder_proj(src_tokens=condition, encoder_padding_mask=padding)
        queries = official.encoder_query.unsqueeze(0).expand(memory["encoder_out"].shape[1], -1, -1)
        y = official.encoder(prev_output_tokens=None, token_embeddings=queries, encoder_out=memory)[0]
    assert y.shape == (3, spec["num_queries"], width)
    out.add("aligner", spec, official, condition=condition, padding_mask=padding, out=y)


def case_mllm_body(fork, out: CaseWriter) -> None:
    """The fork's Decoder (LMDecoder's base) with fairseq sinusoidal positions, text only, right-padded batch."""
    spec = dict(vocab_size=50, width=64, heads=4, ffn_width=256, layers=2, max_positions=32, padding_idx=1,
                weight_seed=15)
    args = fork.config.DecoderConfig(decoder_embed_dim=spec["width"], decoder_attention_heads=spec["heads"],
                                     decoder_ffn_embed_dim=spec["ffn_width"], decoder_layers=spec["layers"],
                                     subln=True, no_scale_embedding=False, vocab_size=spec["vocab_size"],
                                     sope_rel_pos=False)
    embed_tokens = torch.nn.Embedding(spec["vocab_size"], spec["width"], padding_idx=1)
    # fairseq PositionalEmbedding(num, dim, pad, learned=False) -> Sinusoidal(dim, pad, init_size=num + pad + 1)
    embed_positions = fork.sinusoidal_positional_embedding.SinusoidalPositionalEmbedding(
        spec["width"], 1, spec["max_positions"] + 2)
    output_projection = torch.nn.Linear(spec["width"], spec["vocab_size"], bias=False)
    output_projection.weight = embed_tokens.weight
    official = fork.decoder.Decoder(args, embed_tokens, embed_positions, output_projection, is_encoder_decoder=False)
    seeded_weights_(official, spec["weight_seed"])
    ids = torch.tensor([[0, 5, 9, 13, 21, 8, 40], [0, 7, 7, 30, 1, 1, 1]])  # right padding as in batched eval
    with torch.no_grad():
        y = official(ids, features_only=True)[0]  # [B, T, C]
    out.add("mllm_body", spec, official, ids=ids, out=y)


def case_sinusoidal(fork, out: CaseWriter) -> None:
    module = fork.sinusoidal_positional_embedding.SinusoidalPositionalEmbedding
    spec = dict(rows=30, dims=[64, 7], padding_idx=1, module_dim=16, init_sizes=[8, 4])
    tensors = {f"table_dim{dim}": module.get_embedding(30, dim, 1) for dim in spec["dims"]}
    ids = torch.tensor([[0, 4, 4, 9, 1, 1], [0, 1, 3, 3, 3, 3]])
    tensors["ids"] = ids
    for init_size in spec["init_sizes"]:  # 4 < padding_idx + 1 + T = 8: the table grows on demand
        tensors[f"module_out_init{init_size}"] = module(spec["module_dim"], 1, init_size=init_size)(ids)
    out.add("sinusoidal", spec, None, **tensors)


def case_learned_positions(fork, out: CaseWriter) -> None:
    spec = dict(num_embeddings=20, dim=8, weight_seed=19, x_shape=[3, 5, 8])
    module = fork.embedding.PositionalEmbedding(spec["num_embeddings"], spec["dim"])
    seeded_weights_(module, spec["weight_seed"])
    x = torch.zeros(spec["x_shape"])
    with torch.no_grad():
        y = module(x)
    out.add("learned_positions", spec, module, out=y)


def aligner_config_defaults(fork) -> dict:
    official = fork.config.EncoderDecoderConfig()
    return {field: getattr(official, field) for field in ALIGNER_CONFIG_FIELDS}


def generate(mirror: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    commit, sources, blobs = read_fork_sources(mirror)
    fork = load_fork(sources)
    out = CaseWriter()
    case_self_attention(fork, out, flash_attention=False)
    case_self_attention(fork, out, flash_attention=True)
    case_cross_attention(fork, out)
    case_feedforward(fork, out)
    case_encoder_layer(fork, out)
    case_decoder_layer(fork, out)
    case_aligner(fork, out)
    case_mllm_body(fork, out)
    case_sinusoidal(fork, out)
    case_learned_positions(fork, out)
    metadata = {
        "generator": "tests/reference/generate_official_fork_outputs.py",
        "generator_version": GENERATOR_VERSION,
        "source_repository": SOURCE_REPOSITORY,
        "mirror_commit": commit,
        "source_files": json.dumps(blobs, sort_keys=True),
        "cases": json.dumps(out.cases, sort_keys=True),
        "aligner_config_defaults": json.dumps(aligner_config_defaults(fork), sort_keys=True),
        "weight_init": "per parameter (smallest alias name): randn from Generator(seed * 1000003 + crc32(name)); "
                       "1-D *weight -> 1 + 0.1 n; other 1-D -> 0.05 n; else n / sqrt(shape[-1])",
        "torch_version": torch.__version__,
    }
    return out.tensors, metadata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mirror", type=Path, default=DEFAULT_MIRROR, help="bare git dir of xichenpan/Kosmos-G")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--check", action="store_true",
                        help="regenerate in memory and compare with --output instead of writing it")
    args = parser.parse_args()
    tensors, metadata = generate(args.mirror)
    if args.check:
        from safetensors import safe_open

        # another machine (its CPU kernels) rounds the outputs differently (~1e-6): a float32 tensor within CHECK_ATOL
        # counts as the same; shapes, dtypes, the other tensors and the metadata must match exactly
        with safe_open(str(args.output), "pt") as stored:
            stored_metadata = stored.metadata()
            differences, largest = [], 0.0
            for k in sorted(set(stored.keys()) | set(tensors)):
                if k not in tensors or k not in stored.keys():
                    differences.append(k)
                    continue
                old, new = stored.get_tensor(k), tensors[k]
                if torch.equal(old, new):
                    continue
                if (old.shape == new.shape and old.dtype == new.dtype == torch.float32
                        and torch.allclose(old, new, atol=CHECK_ATOL, rtol=0)):
                    largest = max(largest, (old - new).abs().max().item())
                else:
                    differences.append(k)
        differences += sorted(k for k in metadata if k != "torch_version" and stored_metadata.get(k) != metadata[k])
        if differences:
            raise SystemExit(f"{args.output} differs from a fresh generation in: {differences}")
        print(f"{args.output}: up to date ({len(tensors)} tensors, mirror {metadata['mirror_commit']}; outputs within "
              f"{largest:.1e} of a fresh generation, torch {torch.__version__} here, "
              f"{stored_metadata.get('torch_version')} there)")
        return
    save_file(tensors, str(args.output), metadata=metadata)
    print(f"wrote {args.output}: {len(tensors)} tensors, {args.output.stat().st_size} bytes, "
          f"mirror {metadata['mirror_commit']}")


if __name__ == "__main__":
    # the fork's modules import fairscale / timm at module level, like PyPI torchscale does
    with _torchscale.stand_ins_for_missing_dependencies():
        main()
