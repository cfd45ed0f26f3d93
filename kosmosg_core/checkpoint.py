"""Checkpoints: the official fairseq `.pt` key table, the pack's `.safetensors` format, loading, converting.

Two on-disk formats, one model:
- official `checkpoint_final.pt` (fairseq training checkpoint, read by the restricted unpickler in
  `safe_unpickle.py`, never by plain pickle), keys renamed by `OFFICIAL_KEY_RENAMES`;
- the pack's `.safetensors` (written by `convert`, `train.export`, read by the CLI and the ComfyUI
  loader): `KosmosG.state_dict()` names, tokenizer files as uint8 tensors, and metadata
  {"format": "kosmosg", "format_version": "1", "config": <KosmosGConfig JSON>}.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections import Counter
from pathlib import Path

import torch

from .config import AlignerConfig, ConnectorConfig, DecoderConfig, KosmosGConfig, VisionConfig
from .errors import CheckpointError, CheckpointNotFoundError, TokenizerError
from .files import check_input_path_length, check_output_file, path_length_problem, save_safetensors, utf8_text
from .model import KosmosG
from .safe_unpickle import load_pt_state_dict, looks_like_stable_diffusion
from .tokenizer import TOKENIZER_FILENAMES, KosmosGTokenizer, tokenizer_dir_candidates

logger = logging.getLogger(__name__)

FORMAT_NAME = "kosmosg"
FORMAT_VERSION = "1"
TOKENIZER_SPM_KEY = "tokenizer.sentencepiece_model"
TOKENIZER_DICT_KEY = "tokenizer.dict_txt"
DEFAULT_HEAD_DIM = 64  # every official attention uses 64-wide heads

# (official name prefix, ours), both ways in this order (first match wins); {n} = a block number.
OFFICIAL_KEY_RENAMES = [
    ("gpt_model.decoder.", "decoder."),
    ("img_model.visual.transformer.resblocks.{n}.ts_attn.", "vision.resblocks.{n}.attn."),
    ("img_model.visual.transformer.resblocks.", "vision.resblocks."),
    ("img_model.visual.", "vision."),
    ("img_connector.", "connector."),
    ("aligner.", "aligner."),
]


def _prefix_rules(pairs) -> list[tuple[re.Pattern, str]]:
    """(from prefix, to prefix) pairs -> (regex, replacement) rules for `re.sub`."""
    return [(re.compile("^" + re.escape(source).replace(re.escape("{n}"), r"(\d+)")), target.replace("{n}", r"\1"))
            for source, target in pairs]


# The aligner's stage-2 reconstruction branch (decoder queries, decoder, projection back to the MLLM width)
RECONSTRUCTION_KEY_PREFIXES = ("aligner.decoder_query", "aligner.decoder.", "aligner.decoder_proj.")

# Official keys that inference does not use, each with the reason it is safe to drop.
OFFICIAL_KEYS_TO_IGNORE = {
    # tied to embed_tokens (share_decoder_input_output_embed); the LM head reuses embed_tokens
    r"^gpt_model\.decoder\.output_projection\.weight$": "tied LM head (same tensor as embed_tokens)",
    # fairseq sinusoidal module's dtype marker; the table is computed, not stored
    r"^gpt_model\.decoder\.embed_positions\._float_tensor$": "fairseq dtype marker",
    # SoPE/xPos buffer: built by --sope-rel-pos but never applied by LMDecoder.forward
    r"^gpt_model\.decoder\.self_attn_sope\.": "unused SoPE buffer",
    r"^diffusion_unet\.": "SD1.5 U-Net (not for conditioning; generate and Kosmos-G SD1.5 From Checkpoint sample with it)",
    r"^vae\.": "SD1.5 VAE (not for conditioning; generate and Kosmos-G SD1.5 From Checkpoint decode with it)",
    r"^aligner\.clip_encoder\.": "stage-2 CLIP text encoder (loss target only)",
    "^(" + "|".join(map(re.escape, RECONSTRUCTION_KEY_PREFIXES)) + ")": "stage-2 reconstruction branch (training only)",
    r"^img_model\.visual\.proj$": "CLIP projection head (Kosmos-G uses unprojected tokens)",
}

_RENAMES = _prefix_rules(OFFICIAL_KEY_RENAMES)
_IGNORES = [(re.compile(pattern), what) for pattern, what in OFFICIAL_KEYS_TO_IGNORE.items()]
_TS_ATTN_BLOCK = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.ts_attn\.")
_OPEN_CLIP_QKV = re.compile(r"^(img_model\.)?visual\.transformer\.resblocks\.(\d+)\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)$")


def ignored_as(key: str) -> str | None:
    """What an official key inference does not use is (OFFICIAL_KEYS_TO_IGNORE's description), else None."""
    return next((what for pattern, what in _IGNORES if pattern.search(key)), None)


# --- official -> ours ------------------------------------------------------------------------------
def rename_official_state_dict(official: dict[str, torch.Tensor], keep_reconstruction: bool = False
                               ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map official keys to `KosmosG` names. Returns (state dict, ignored official keys)."""
    renamed, ignored = {}, []
    # A block's official `ts_attn` is the attention its forward runs; a file saved from a model built without
    # --visual-pretrained also keeps the block's open_clip `attn`, unused: ignored by rule, not by key order
    blocks_with_ts_attn = {m.group(1) for key in official for m in [_TS_ATTN_BLOCK.search(key)] if m}
    for key, tensor in official.items():
        match = _OPEN_CLIP_QKV.match(key)
        if match and match.group(2) in blocks_with_ts_attn:
            ignored.append(key)
            continue
        if match:  # open_clip layout (ViT-L-14-sd.pt): fused q/k/v, split like the official init does
            block, name = match.group(2), match.group(3)
            prefix = f"vision.resblocks.{block}.attn."
            if name.startswith("in_proj"):
                suffix = "weight" if name.endswith("weight") else "bias"
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                    renamed[f"{prefix}{part}.{suffix}"] = chunk
            else:
                renamed[prefix + name] = tensor
            continue
        reconstruction = key.startswith(RECONSTRUCTION_KEY_PREFIXES)
        if ignored_as(key) is not None and not (keep_reconstruction and reconstruction):
            ignored.append(key)
            continue
        for pattern, replacement in _RENAMES:
            if pattern.search(key):
                renamed[pattern.sub(replacement, key, count=1)] = tensor
                break
        else:
            renamed[key] = tensor  # reported as unexpected by the strict check
    return renamed, ignored


_OUR_TO_OFFICIAL = _prefix_rules((ours, official) for official, ours in OFFICIAL_KEY_RENAMES)


def to_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `rename_official_state_dict` (for benchmarks and round-trip tests): our names ->
    official names, plus the tied `output_projection.weight` sharing the embedding tensor."""
    official = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in _OUR_TO_OFFICIAL:
            if pattern.search(key):
                key = pattern.sub(replacement, key, count=1)
                break
        official[key] = tensor
    official["gpt_model.decoder.output_projection.weight"] = official["gpt_model.decoder.embed_tokens.weight"]
    return official


def _count_layers(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in keys for m in [pattern.match(k)] if m}
    return max(indices) + 1 if indices else 0


def infer_config(state_dict: dict[str, torch.Tensor], head_dim: int = DEFAULT_HEAD_DIM) -> KosmosGConfig:
    """Read every size from tensor shapes (our names). Head counts assume `head_dim`-wide heads."""
    sd, keys = state_dict, list(state_dict)
    try:
        vocab, width = sd["decoder.embed_tokens.weight"].shape
        vision_width, _, patch, _ = sd["vision.conv1.weight"].shape
        num_tokens = sd["vision.positional_embedding"].shape[0]
        num_queries = sd["connector.latent_query"].shape[0]
        context_queries, context_dim = sd["aligner.encoder_query"].shape
        grid = round((num_tokens - 1) ** 0.5)
        cfg = KosmosGConfig(
            vision=VisionConfig(
                image_size=grid * patch, patch_size=patch, width=vision_width,
                layers=_count_layers(keys, "vision.resblocks."), heads=max(1, vision_width // head_dim),
                mlp_ratio=sd["vision.resblocks.0.mlp.c_fc.weight"].shape[0] / vision_width),
            connector=ConnectorConfig(num_queries=num_queries, heads=max(1, width // head_dim)),
            decoder=DecoderConfig(
                vocab_size=vocab, width=width, layers=_count_layers(keys, "decoder.layers."),
                heads=max(1, width // head_dim), ffn_width=sd["decoder.layers.0.ffn.fc1.weight"].shape[0]),
            aligner=AlignerConfig(
                width=context_dim, heads=max(1, context_dim // head_dim),
                ffn_width=sd["aligner.encoder_proj.layers.0.ffn.fc1.weight"].shape[0],
                encoder_layers=_count_layers(keys, "aligner.encoder_proj.layers."),
                decoder_layers=_count_layers(keys, "aligner.encoder.layers."),
                num_queries=context_queries,
                max_positions=sd["aligner.encoder_proj.embed_positions.weight"].shape[0]),
            image_token_slots=num_queries,
        )
    except KeyError as e:
        raise CheckpointError(f"Checkpoint lacks the tensor {e.args[0]!r} needed to read the model's sizes; "
                              "it is not a complete Kosmos-G checkpoint.") from e
    # ValueError: a size check; the others: shapes no model has (0 channels, a 0-dim tensor), from a damaged file
    except (ValueError, ArithmeticError, TypeError, IndexError) as e:
        raise CheckpointError(f"Cannot derive a Kosmos-G config from the checkpoint's shapes: {e} "
                              "Pass the model's config JSON explicitly (config=...).") from e
    return cfg


# --- checks ----------------------------------------------------------------------------------------
def _describe_foreign(keys) -> str:
    keys = list(keys)
    if looks_like_stable_diffusion(keys):
        return "it looks like a Stable Diffusion checkpoint (model.diffusion_model.* keys), not Kosmos-G"
    if any(k.startswith(("down_blocks.", "up_blocks.", "conv_in.")) for k in keys):
        return "it looks like a diffusers U-Net/VAE, not Kosmos-G"
    if any(k.startswith(("text_model.", "vision_model.")) for k in keys):
        return "it looks like a CLIP model, not Kosmos-G"
    return "none of its tensors belong to Kosmos-G (expected gpt_model.decoder.*, img_model.visual.*, aligner.*)"


def state_dict_mismatch(expected: dict, given: dict, allow_missing: tuple[str, ...] = ()) -> str | None:
    """None when `given` holds every tensor of `expected` (those under `allow_missing` prefixes may be absent),
    no other, each of the expected shape and kind (floating point or not); else what differs ("2 missing tensors:
    a, b; 1 unexpected tensor: c" or "tensor a has shape (2, 3) but the model expects (3, 3)"), for the caller's
    error."""
    def show(names):
        return ", ".join(names[:8]) + (f" ... (+{len(names) - 8} more)" if len(names) > 8 else "")

    missing = sorted(k for k in set(expected) - set(given) if not k.startswith(allow_missing))
    unexpected = sorted(set(given) - set(expected))
    parts = [f"{len(names)} {kind} tensor{'s' if len(names) > 1 else ''}: {show(names)}"
             for kind, names in (("missing", missing), ("unexpected", unexpected)) if names]
    if parts:
        return "; ".join(parts)
    for name, tensor in given.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            return f"tensor {name} has shape {tuple(tensor.shape)} but the model expects {tuple(expected[name].shape)}"
        # loading casts floating point weights to the asked dtype; an integer or complex one cannot be a weight
        if tensor.is_floating_point() != expected[name].is_floating_point():
            kind = "floating point" if expected[name].is_floating_point() else f"{expected[name].dtype}"
            return f"tensor {name} holds {tensor.dtype} values but the model expects {kind} ones"
        if tensor.is_floating_point() and not _castable(tensor.dtype):  # e.g. float4: torch has no cast from it
            return f"tensor {name} holds {tensor.dtype} values, which this PyTorch cannot convert to the model's dtype"
    return None


@functools.cache
def _castable(dtype: torch.dtype) -> bool:
    """Whether this PyTorch converts `dtype` values to float32 (loading casts every weight to the asked dtype)."""
    try:
        torch.zeros(2, dtype=torch.float32).to(dtype).to(torch.float32)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


@functools.lru_cache(maxsize=4)
def _model_tensors(config_json: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return KosmosG(KosmosGConfig.from_json(config_json)).state_dict()


def model_tensors(cfg: KosmosGConfig) -> dict[str, torch.Tensor]:
    """The tensors a `KosmosG(cfg)` holds, as meta tensors (names, shapes, dtypes; no memory), built once per config."""
    return _model_tensors(cfg.to_json())


def model_nbytes(cfg: KosmosGConfig, dtype: torch.dtype) -> int:
    """The bytes a `KosmosG(cfg)`'s tensors take in `dtype` (its floating ones cast; other ones as they are): what
    the weights take in memory, known before they are read."""
    return sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
               for t in model_tensors(cfg).values())


def _check_keys(path, expected: dict[str, torch.Tensor], state_dict: dict) -> None:
    mismatch = state_dict_mismatch(expected, state_dict)
    if mismatch:
        raise CheckpointError(f"Checkpoint {path} does not match the Kosmos-G architecture of its config: {mismatch}. "
                              "Use a complete Kosmos-G checkpoint (checkpoint_final.pt or a converted .safetensors) "
                              "with the config it was trained with.")


def build_model(cfg: KosmosGConfig, state_dict: dict, path, dtype: torch.dtype, device) -> KosmosG:
    """`read_checkpoint`'s config and tensors -> the model in eval mode, on `device` in `dtype` (checked to fit:
    a CheckpointError naming `path` otherwise). Built on the meta device: no memory for random weights."""
    with torch.device("meta"):
        model = KosmosG(cfg)
    _check_keys(path, model.state_dict(), state_dict)
    # assign=True adopts the loaded (mmap-backed) tensors instead of copying into fresh ones.
    state_dict = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
                  for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


# --- tokenizer lookup ------------------------------------------------------------------------------
def _places(checkpoint_path: Path) -> list[Path]:
    """The checkpoint's path, then, for a symlink (e.g. linked into models/kosmosg), the file it points to:
    files that belong to it are looked for beside both."""
    return [checkpoint_path, checkpoint_path.resolve()] if checkpoint_path.is_symlink() else [checkpoint_path]


def find_tokenizer_dir(checkpoint_path: Path) -> Path | None:
    """Tokenizer folder beside a checkpoint (or its symlink's target), in `TOKENIZER_DIR_NAMES` order:
    `<stem>/`, `<stem>-tokenizer/`, `tokenizer/`, `data/`, or the same folder."""
    for place in _places(checkpoint_path):
        for candidate in tokenizer_dir_candidates(place):
            if all((candidate / name).is_file() for name in TOKENIZER_FILENAMES):
                return candidate
    return None


def _resolve_tokenizer(path: Path, embedded: KosmosGTokenizer | None, tokenizer_dir) -> KosmosGTokenizer:
    if tokenizer_dir is not None:
        return KosmosGTokenizer.from_dir(tokenizer_dir)
    if embedded is not None:
        return embedded
    found = find_tokenizer_dir(path)
    if found is None:
        target = f" (nor their twins beside the link's target {path.resolve()})" if len(_places(path)) > 1 else ""
        raise TokenizerError(
            f"No tokenizer found for {path}: the checkpoint holds none, and none of "
            f"{', '.join(map(str, tokenizer_dir_candidates(path)))}{target} contains "
            f"{' + '.join(TOKENIZER_FILENAMES)}. Put the official sentencepiece.bpe.model and dict.txt (from the "
            "Kosmos-G release's data/ folder) in one of them, or give the folder (CLI: --tokenizer DIR).")
    return KosmosGTokenizer.from_dir(found)


# --- public API ------------------------------------------------------------------------------------
def read_checkpoint(path, config: KosmosGConfig | None = None, not_read: list[str] | None = None,
                    read_tensors: bool = True) -> tuple[KosmosGConfig, dict[str, torch.Tensor], KosmosGTokenizer | None]:
    """Read either format -> (config, state dict with our names, embedded tokenizer or None). An official file's
    keys that match OFFICIAL_KEYS_TO_IGNORE are never read; `not_read`, when given, collects them.
    read_tensors False: the state dict holds meta tensors of the stored shapes and dtypes, no weight is read."""
    path = check_checkpoint_path(path)
    if file_format(path) == "safetensors":
        return _read_pack(path, config, read_tensors)

    # the tensors inference does not use (the official file's U-Net and VAE: GBs) are never read
    def include(key: str) -> bool:
        ignored = ignored_as(key) is not None
        if ignored and not_read is not None:
            not_read.append(key)
        return not ignored

    official = load_pt_state_dict(path, key="model", include=include, read=read_tensors)
    if not any(k.startswith(("gpt_model.decoder.", "img_model.visual.", "aligner.encoder")) for k in official):
        raise CheckpointError(f"{path} is not a Kosmos-G checkpoint: {_describe_foreign(official)}.")
    state_dict, _ = rename_official_state_dict(official)
    cfg = config or _sidecar_config(path)
    if cfg is None:
        try:
            cfg = infer_config(state_dict)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from e
    return cfg, state_dict, None


def check_checkpoint_path(path) -> Path:
    """`path` as a Path if it names a readable checkpoint file, else the error naming what is wrong and the fix."""
    path = Path(path)
    check_input_path_length(path, "Kosmos-G checkpoint", CheckpointNotFoundError)  # before exists(), which raises on it
    if not path.exists():
        raise CheckpointNotFoundError(f"Kosmos-G checkpoint not found: {path}. Check the path (official "
                                      "checkpoint_final.pt or a converted .safetensors).")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give the checkpoint file inside it (.pt or .safetensors).")
    if not path.is_file():  # a FIFO or device: reading it would block or never end
        raise CheckpointError(f"{path} is not a regular file; give the checkpoint file (.pt or .safetensors).")
    return path


def official_tensor_names(path) -> list[str]:
    """The tensor names in an official `.pt`'s model state dict, none of the tensors read; [] for a `.safetensors`."""
    path = check_checkpoint_path(path)
    if file_format(path) == "safetensors":
        return []
    names = []

    def note(name: str) -> bool:
        names.append(name)
        return False  # read nothing

    load_pt_state_dict(path, key="model", include=note)
    return names


def file_format(path: Path) -> str:
    """"safetensors" or "pt": by the content where it is clear (a renamed file still loads), else by the suffix."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"Cannot read {path}: {e}.") from e
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then the JSON header
        return "safetensors"
    if head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save: a zip archive, or a legacy raw pickle
        return "pt"
    return "safetensors" if path.suffix.lower() == ".safetensors" else "pt"


def _sidecar_path(path: Path) -> Path | None:
    """The optional config file beside a .pt (or its symlink's target) that `_sidecar_config` reads, if any."""
    for candidate in [c for place in _places(path) for c in (place.with_suffix(".json"), place.parent / "kosmosg_config.json")]:
        # <name>.json can be too long where the checkpoint's own <name>.pt is not: then no such file exists
        if not path_length_problem(candidate) and candidate.is_file():
            return candidate
    return None


def _sidecar_config(path: Path) -> KosmosGConfig | None:
    """An optional `<checkpoint>.json` / `kosmosg_config.json` beside a .pt (or its symlink's target) overrides
    the inferred sizes."""
    candidate = _sidecar_path(path)
    if candidate is None:
        return None
    try:
        return KosmosGConfig.from_json(candidate.read_text())
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"Config file {candidate} is not a valid Kosmos-G config: {e}") from e


def checkpoint_files(path) -> list[Path]:
    """The checkpoint and the files its loading also reads: an official .pt's sidecar config, the tokenizer files
    beside it when the checkpoint holds none. What makes the model, for callers that notice a change (the ComfyUI
    Loader re-opens it when any of them is replaced)."""
    path = check_checkpoint_path(path)
    files = [path]
    embedded = False
    if file_format(path) == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                embedded = TOKENIZER_SPM_KEY in f.keys()
        except (SafetensorError, OSError) as e:
            raise _unreadable_safetensors(path, e) from e
    else:
        sidecar = _sidecar_path(path)
        files += [sidecar] if sidecar is not None else []
    tokenizer_dir = None if embedded else find_tokenizer_dir(path)
    return files + ([tokenizer_dir / name for name in TOKENIZER_FILENAMES] if tokenizer_dir is not None else [])


# safetensors' dtype names -> torch's, those this torch has (a file with another is refused, as loading it would be)
_SAFETENSORS_DTYPES = {name: getattr(torch, dtype) for name, dtype in {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool"}.items() if hasattr(torch, dtype)}


def _meta_tensor(tensor_slice, path: Path, key: str) -> torch.Tensor:
    """A safetensors slice's shape and dtype as a meta tensor (nothing read)."""
    dtype = _SAFETENSORS_DTYPES.get(tensor_slice.get_dtype())
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {key} holds {tensor_slice.get_dtype()} values, which this loader does "
                              "not read. Re-convert the checkpoint (fp32, fp16 or bf16).")
    return torch.empty(tensor_slice.get_shape(), dtype=dtype, device="meta")


def _unreadable_safetensors(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(f"{path} is truncated or corrupt ({error}). Re-download or re-convert it.")


def _read_pack(path: Path, config: KosmosGConfig | None, read_tensors: bool = True):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
            if metadata.get("format") != FORMAT_NAME:
                raise CheckpointError(f"{path} is not a Kosmos-G .safetensors file: {_describe_foreign(keys)}. "
                                      "Convert official checkpoints with `python -m kosmosg_core convert`.")
            if metadata.get("format_version") != FORMAT_VERSION:
                raise CheckpointError(f"{path} has Kosmos-G format version {metadata.get('format_version')!r}; this "
                                      f"version of the pack reads version {FORMAT_VERSION}. Update the pack.")
            tensors = {k: f.get_tensor(k) if read_tensors or k in (TOKENIZER_SPM_KEY, TOKENIZER_DICT_KEY)
                       else _meta_tensor(f.get_slice(k), path, k) for k in keys}
    except SafetensorError as e:
        raise _unreadable_safetensors(path, e) from e
    except OSError as e:
        raise CheckpointError(f"Cannot read {path}: {e}.") from e
    tokenizer = None
    if TOKENIZER_SPM_KEY in tensors and TOKENIZER_DICT_KEY in tensors:
        for key in (TOKENIZER_SPM_KEY, TOKENIZER_DICT_KEY):
            if tensors[key].dtype != torch.uint8:  # the files' bytes as written; .numpy() cannot even read bfloat16
                raise CheckpointError(f"{path}: tensor {key} holds {tensors[key].dtype} values, not the tokenizer "
                                      "file's bytes (uint8); the file is damaged. Re-download or re-convert it.")
        tokenizer = KosmosGTokenizer.from_bytes(tensors.pop(TOKENIZER_SPM_KEY).numpy().tobytes(),
                                                tensors.pop(TOKENIZER_DICT_KEY).numpy().tobytes(), source=str(path))
    try:
        cfg = config or KosmosGConfig.from_json(metadata["config"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its embedded config is missing or invalid ({e}).") from e
    return cfg, tensors, tokenizer


def load_model(path, tokenizer_dir=None, dtype: torch.dtype = torch.float32, device="cpu",
               config: KosmosGConfig | None = None) -> tuple[KosmosG, KosmosGTokenizer]:
    """Load a Kosmos-G checkpoint (official .pt or pack .safetensors) -> (model in eval mode, tokenizer)."""
    path = Path(path)
    cfg, state_dict, embedded_tokenizer = read_checkpoint(path, config)
    tokenizer = _resolve_tokenizer(path, embedded_tokenizer, tokenizer_dir)
    tokenizer.check_matches(cfg.decoder.vocab_size)
    model = build_model(cfg, state_dict, path, dtype, device)
    return model, tokenizer


def inspect_checkpoint(path, tokenizer_dir=None, config: KosmosGConfig | None = None
                       ) -> tuple[KosmosGConfig, KosmosGTokenizer]:
    """What `load_model` checks, without reading the weights -> (config, tokenizer): the file's format, every tensor's
    name, shape and kind against the config, the tokenizer against the vocabulary. Only damaged tensor data is left
    for the load to find."""
    path = Path(path)
    cfg, tensor_specs, embedded_tokenizer = read_checkpoint(path, config, read_tensors=False)  # meta tensors
    tokenizer = _resolve_tokenizer(path, embedded_tokenizer, tokenizer_dir)  # in load_model's order of checks
    tokenizer.check_matches(cfg.decoder.vocab_size)
    _check_keys(path, model_tensors(cfg), tensor_specs)
    return cfg, tokenizer


def check_checkpoint_tensors(path, config: KosmosGConfig | None = None) -> KosmosGConfig:
    """`inspect_checkpoint` without the tokenizer (e.g. a file whose tokenizer is elsewhere) -> its config."""
    cfg, tensor_specs, _ = read_checkpoint(Path(path), config, read_tensors=False)
    _check_keys(path, model_tensors(cfg), tensor_specs)
    return cfg


def save_pack_checkpoint(model: KosmosG, tokenizer: KosmosGTokenizer | None, path, dtype: torch.dtype | None = None,
                         extra_metadata: dict | None = None) -> Path:
    """Write the pack's .safetensors (inference tensors only) atomically (temp file + rename)."""
    path = Path(path)
    state = model.state_dict()
    inference_cfg = model.cfg.for_inference()
    with torch.device("meta"):  # names of the inference tensors (no training-only branches)
        keep = set(KosmosG(inference_cfg).state_dict())
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
               for k, v in state.items() if k in keep}
    # safetensors refuses tensors that share memory; a .pt may hold two weights as one tensor (loading keeps that)
    storages = set()
    for name, tensor in tensors.items():
        if tensor.untyped_storage().data_ptr() in storages:
            tensors[name] = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
    if tokenizer is not None:
        spm_bytes, dict_bytes = tokenizer.to_bytes()
        tensors[TOKENIZER_SPM_KEY] = torch.frombuffer(bytearray(spm_bytes), dtype=torch.uint8)
        tensors[TOKENIZER_DICT_KEY] = torch.frombuffer(bytearray(dict_bytes), dtype=torch.uint8)
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": inference_cfg.to_json()}
    metadata.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    return save_safetensors(tensors, path, metadata)


def convert_official(pt_path, out_path, tokenizer_dir=None, dtype: torch.dtype | None = None,
                     config: KosmosGConfig | None = None) -> Path:
    """Official checkpoint_final.pt (+ tokenizer folder) -> one pack .safetensors with the tokenizer inside.

    A pack .safetensors is accepted too (e.g. to re-cast it to float16), its own tokenizer kept unless
    tokenizer_dir is given. dtype None keeps the file's own floating dtype (official files are most likely fp16)."""
    pt_path = Path(pt_path)
    # before the (long) read; never the source itself (a pack re-cast in place would lose its original)
    out_path = check_output_file(out_path, "The converted file", inputs=(pt_path,), suffix=".safetensors",
                                 suffix_why="it must end in .safetensors (the pack's format; the loaders tell the "
                                            "formats apart by it)")
    cfg, state_dict, embedded_tokenizer = read_checkpoint(pt_path, config)
    tokenizer = _resolve_tokenizer(pt_path, embedded_tokenizer, tokenizer_dir)
    tokenizer.check_matches(cfg.decoder.vocab_size)
    if dtype is None:
        dtype = next(t.dtype for t in state_dict.values() if t.is_floating_point())
    model = build_model(cfg, state_dict, pt_path, dtype, "cpu")
    return save_pack_checkpoint(model, tokenizer, out_path, extra_metadata={"source": utf8_text(pt_path.name)})


def describe(path) -> dict:
    """Summary of a checkpoint without building the model (for `info`). `not_read`: what an official file also holds
    that conditioning does not use (e.g. whether it carries SD1.5's U-Net and VAE), as {what it is: number of
    tensors}; a converted file holds none of it."""
    not_read = []
    # names, shapes and dtypes only (meta tensors): a review found `info` read every weight of an official file
    cfg, state_dict, tokenizer = read_checkpoint(Path(path), not_read=not_read, read_tensors=False)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state_dict.values()})
    groups = Counter(ignored_as(key) for key in not_read)
    beside = None if tokenizer is not None else find_tokenizer_dir(Path(path))
    return {"path": str(path), "config": json.loads(cfg.to_json()), "dtypes": dtypes,
            "parameters": sum(t.numel() for t in state_dict.values()), "tokenizer_embedded": tokenizer is not None,
            # an official file's tokenizer folder, as encode / convert / the Loader find it (None: none found there)
            "tokenizer_dir": None if beside is None else str(beside), "not_read": dict(sorted(groups.items()))}
