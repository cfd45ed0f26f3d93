"""Kosmos-G conditioning files: ComfyUI CONDITIONING values <-> .safetensors (no ComfyUI import).

A CONDITIONING is a list of entries `[cond [B, T, C], extras dict]` (extras: "pooled_output" [B, C],
"mask", "area", ... any plain data). File layout, format version 2 (content-keyed: the name ends with a
hash of the tensors, so saving the same conditioning twice writes one file):
    tensors  "entry{i}.cond" [B, T, C] (its own dtype), and every tensor among entry i's keys, named by
             its place: "entry{i}.pooled_output" [B, C], "entry{i}.mask", "entry{i}.reference_latents.0"...
    metadata {"format": "kosmosg_conditioning", "format_version": "2",
              "entries": JSON list of each entry's keys: plain values as JSON, tuples as {"__tuple__": [...]}
              (ComfyUI compares `area` tuples with ==), tensors as {"__tensor__": "<tensor name>"}}
Keys holding live objects (ControlNet, hooks) are not saved: re-apply those nodes after loading; nor are keys
named like a tag (a key "__tuple__" / "__tensor__" at any depth would read back as one). Both are logged.
Also read: version 1 files (plain JSON entries, top-level tensors only) and `python -m kosmosg_core encode
--out` files (one tensor "cond" [B, T, C]; pooled_output is then its mean over T, as Kosmos-G Encode gives).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from .errors import ConditioningFileError, OutputPathError
from .files import check_output_file, read_safetensors, save_safetensors

logger = logging.getLogger(__name__)

ENCODE_TENSOR_NAME = "cond"  # the one tensor of `python -m kosmosg_core encode --out` files

FORMAT_NAME = "kosmosg_conditioning"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
TUPLE_TAG, TENSOR_TAG = "__tuple__", "__tensor__"


class _NotSaveable(Exception):
    """A value (or a part of it) the file cannot hold; its message says why."""


LIVE_OBJECT = "a live object: re-apply that node after loading"
RESERVED_KEY = f"the file format reserves the keys {TUPLE_TAG!r} and {TENSOR_TAG!r}: rename that key"


def check_encode_output(path, inputs=()) -> Path:
    """`encode --out`: a .safetensors path that can be written, and, where a file is there, one encode wrote (its one
    tensor `cond`), never another file (a review saw a PNG, a tokenizer file and a model overwritten)."""
    from safetensors import safe_open

    path = check_output_file(path, "--out", inputs=inputs, suffix=".safetensors",
                             suffix_why="encode writes a .safetensors file (ComfyUI's Kosmos-G Load Conditioning "
                                        "lists those)")
    if path.exists():
        if not path.is_file():  # a FIFO: reading it would block
            raise OutputPathError(f"--out {path} exists and is not a regular file; choose another name.")
        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
        except Exception:  # noqa: BLE001 - safetensors raises its own error types for a file of another kind
            names = None
        if names != [ENCODE_TENSOR_NAME]:
            raise OutputPathError(f"--out {path} exists and is not a conditioning encode wrote; choose another name "
                                  "(or delete that file first).")
    return path


def _encode_value(value, name: str, tensors: dict[str, torch.Tensor]):
    """An entry's value -> JSON-ready form (tensors stored into `tensors` under `name`...), or _NotSaveable."""
    if isinstance(value, torch.Tensor):
        while name in tensors:  # a dict key holding "." could repeat a place's name
            name += "_"
        tensors[name] = _own_copy(value)
        return {TENSOR_TAG: name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_encode_value(item, f"{name}.{k}", tensors) for k, item in enumerate(value)]
        return {TUPLE_TAG: items} if isinstance(value, tuple) else items
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        if {TUPLE_TAG, TENSOR_TAG} & set(value):  # it would read back as a tuple / tensor reference
            raise _NotSaveable(RESERVED_KEY)
        return {key: _encode_value(item, f"{name}.{key}", tensors) for key, item in value.items()}
    raise _NotSaveable(LIVE_OBJECT)  # a ControlNet, a hook, a model patch... (or a mapping with non-text keys)


def _own_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor to store, on the CPU in memory of its own: safetensors refuses to write tensors that share memory,
    and stock nodes share them (ConditioningCombine of a conditioning with an area version of itself holds one
    `cond` twice; ComfyUI's intermediate device is the CPU, where .cpu() copies nothing)."""
    return tensor.detach().to("cpu", copy=True).contiguous()


class _DamagedValue(Exception):
    """An entry's JSON is not one this format writes; its message says where."""


def _decode_value(value, tensors: dict[str, torch.Tensor], device):
    if isinstance(value, list):
        return [_decode_value(item, tensors, device) for item in value]
    if isinstance(value, dict):
        if set(value) == {TENSOR_TAG}:
            name = value[TENSOR_TAG]
            if not isinstance(name, str) or name not in tensors:
                raise _DamagedValue(f"it refers to a tensor {str(name)[:100]!r} the file does not hold")
            return tensors[name].to(device)
        if set(value) == {TUPLE_TAG}:
            if not isinstance(value[TUPLE_TAG], list):
                raise _DamagedValue(f"a tuple is written as {type(value[TUPLE_TAG]).__name__}, not a list")
            return tuple(_decode_value(item, tensors, device) for item in value[TUPLE_TAG])
        return {key: _decode_value(item, tensors, device) for key, item in value.items()}
    return value


def conditioning_to_file_content(conditioning, dropped_keys: list[str] | None = None
                                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """-> (tensors, metadata) of the file. Values that are not data (a ControlNet, hooks) are left out, with a
    warning; `dropped_keys`, when given, collects their keys."""
    tensors, entries = {}, []
    for i, (cond, extras) in enumerate(conditioning):
        tensors[f"entry{i}.cond"] = _own_copy(cond)
        encoded, dropped = {}, []
        for key, value in extras.items():
            kept = dict(tensors)
            try:
                if key in (TUPLE_TAG, TENSOR_TAG):  # the entry itself would read back as a tuple / tensor
                    raise _NotSaveable(RESERVED_KEY)
                encoded[key] = _encode_value(value, f"entry{i}.{key}", tensors)
            except _NotSaveable as reason:
                tensors = kept  # none of a dropped key's tensors stay
                dropped.append(f"{key!r} ({reason})")
                if dropped_keys is not None and key not in dropped_keys:
                    dropped_keys.append(key)
        if dropped:
            logger.warning("Kosmos-G Save Conditioning: not saving %s.", "; ".join(dropped))
        entries.append(encoded)
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "entries": json.dumps(entries)}
    return tensors, metadata


def content_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(str(tensors[name].dtype).encode() + repr(tuple(tensors[name].shape)).encode())
        digest.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _holds(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    """Whether `path` is a readable conditioning file holding exactly these tensors and metadata (a damaged one,
    e.g. a value flipped on disk, is written again)."""
    from safetensors import SafetensorError

    try:
        stored, stored_metadata = read_safetensors(path)
    except (SafetensorError, OSError, RuntimeError):
        return False
    return stored_metadata == metadata and stored.keys() == tensors.keys() and all(
        stored[name].dtype == tensor.dtype and torch.equal(stored[name], tensor) for name, tensor in tensors.items())


def read_conditioning_file(path, device="cpu") -> list:
    """A conditioning file (any readable version, or an `encode --out` file) -> CONDITIONING on `device`."""
    from safetensors import SafetensorError

    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO: reading it would block
        raise ConditioningFileError(f"Conditioning file {path} is not a regular file; give a file Kosmos-G Save "
                                    "Conditioning (or encode --out) wrote.")
    try:  # tensors of their own: ComfyUI keeps a node's output, and the file may be replaced meanwhile
        tensors, metadata = read_safetensors(path)
    # RuntimeError: torch opening the file again after safetensors read its header (replaced or removed meanwhile)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ConditioningFileError(f"Cannot read conditioning file {path}: {e}. Save it again with Kosmos-G Save "
                                    "Conditioning.") from e
    if metadata.get("format") is None and set(tensors) == {ENCODE_TENSOR_NAME}:
        cond = _checked_cond(tensors[ENCODE_TENSOR_NAME], path, ENCODE_TENSOR_NAME).to(device)
        return [[cond, {"pooled_output": cond.mean(dim=1)}]]
    if metadata.get("format") != FORMAT_NAME:
        raise ConditioningFileError(f"{path} is not a Kosmos-G conditioning file (metadata format "
                                    f"{metadata.get('format')!r}); only files written by Kosmos-G Save Conditioning or "
                                    "`python -m kosmosg_core encode --out` can be loaded.")
    version = metadata.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ConditioningFileError(f"{path} has conditioning format version {version!r}; this pack reads versions "
                                    f"{', '.join(READABLE_VERSIONS)}. Update the pack.")
    damaged = f"{path} is damaged: {{}}. Save the conditioning again with Kosmos-G Save Conditioning."
    try:
        entries = json.loads(metadata.get("entries", "[]"))
    except (ValueError, RecursionError) as e:
        raise ConditioningFileError(damaged.format(f"its entries are not readable JSON ({str(e)[:100]})")) from e
    if not isinstance(entries, list) or not entries or not all(isinstance(entry, dict) for entry in entries):
        raise ConditioningFileError(damaged.format("its entries are not a non-empty list of mappings"))
    conditioning = []
    for i, encoded in enumerate(entries):
        prefix = f"entry{i}."
        if prefix + "cond" not in tensors:
            raise ConditioningFileError(damaged.format(f"entry {i} has no tensor {prefix}cond"))
        try:
            extras = _decode_value(encoded, tensors, device)
        except _DamagedValue as e:
            raise ConditioningFileError(damaged.format(f"entry {i}: {e}")) from None
        except RecursionError:
            raise ConditioningFileError(damaged.format(f"entry {i} is nested too deeply")) from None
        if version == "1" and isinstance(extras, dict):  # top-level tensors were not in the JSON; tuples were lists
            extras.update({name[len(prefix):]: tensor.to(device) for name, tensor in tensors.items()
                           if name.startswith(prefix) and name != prefix + "cond"})
            if isinstance(extras.get("area"), list):
                extras["area"] = tuple(extras["area"])
        problem = _extras_problem(extras)
        if problem:
            raise ConditioningFileError(damaged.format(f"entry {i}: {problem}"))
        conditioning.append([_checked_cond(tensors[prefix + "cond"], path, prefix + "cond").to(device), extras])
    return conditioning


def _extras_problem(extras) -> str | None:
    """What is wrong with an entry's decoded extras for ComfyUI's nodes (which copy them as a dict and take
    pooled_output as [B, C] floats, a mask as a tensor), or None."""
    if not isinstance(extras, dict):
        return f"its keys are written as {type(extras).__name__}, not a mapping"
    pooled = extras.get("pooled_output")
    if pooled is not None and not (isinstance(pooled, torch.Tensor) and pooled.dim() == 2
                                   and pooled.dtype in CONDITIONING_DTYPES):
        shown = f"{pooled.dtype} {list(pooled.shape)}" if isinstance(pooled, torch.Tensor) else type(pooled).__name__
        return f"pooled_output is {shown}, not a [batch, channels] float tensor"
    if "mask" in extras and not isinstance(extras["mask"], torch.Tensor):
        return f"mask is {type(extras['mask']).__name__}, not a tensor"
    return None


# the float types a conditioning is computed and sampled in (float8 has no isfinite, and samplers take none of it)
CONDITIONING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _checked_cond(cond: torch.Tensor, path, name: str,
                  fix: str = "Save the conditioning again with Kosmos-G Save Conditioning.") -> torch.Tensor:
    """A conditioning tensor must be finite [B, T, C] floating point with B, T, C >= 1 (what samplers take)."""
    if cond.dim() != 3 or cond.numel() == 0 or cond.dtype not in CONDITIONING_DTYPES:
        raise ConditioningFileError(f"{path}: {name} is {cond.dtype} {list(cond.shape)}, not a [batch, tokens, channels] "
                                    f"float16/bfloat16/float32/float64 conditioning. {fix}")
    if not torch.isfinite(cond).all():  # it would sample black images
        raise ConditioningFileError(f"{path}: {name} holds inf/NaN values; encode the subject again and save that.")
    return cond


def _file_name(prefix: str, digest: str) -> str:
    return f"{prefix}_{digest[:16]}.safetensors"


def check_filename_prefix(filename_prefix, folder) -> str:
    """The prefix `save_conditioning` names files with (empty: "kosmosg"), checked before anything is computed: a
    plain name whose file names fit `folder`'s file system; a ConditioningFileError / OutputPathError otherwise."""
    prefix = (filename_prefix or "").strip() or "kosmosg"  # white space alone: the default too
    if os.path.basename(prefix) != prefix or prefix in (".", ".."):
        raise ConditioningFileError(f"filename_prefix {filename_prefix!r} must be a plain name (no folders).")
    check_output_file(os.path.join(folder, _file_name(prefix, "0" * 16)), "filename_prefix")  # e.g. a name too long
    return prefix


def save_conditioning(conditioning, folder, filename_prefix: str = "kosmosg", dropped_keys: list[str] | None = None
                      ) -> str:
    """Write `conditioning` into `folder` as `<prefix>_<content hash>.safetensors` -> that file name. The same
    content is written once (a file already holding it is kept). `dropped_keys`: collects the keys of what is
    not data and so not saved (`conditioning_to_file_content`)."""
    prefix = check_filename_prefix(filename_prefix, folder)
    if not conditioning:
        raise ConditioningFileError("conditioning is empty (no entries): connect the output of an encode node.")
    for i, (cond, _) in enumerate(conditioning):  # a file read_conditioning_file refuses would be lost work
        _checked_cond(cond, "conditioning", f"entry {i}", fix="Connect the output of an encode node.")
    tensors, metadata = conditioning_to_file_content(conditioning, dropped_keys)
    name = _file_name(prefix, content_hash(tensors, metadata))
    path = check_output_file(os.path.join(folder, name), "filename_prefix")
    if not _holds(path, tensors, metadata):  # content-keyed: the same content is there already, unless damaged
        save_safetensors(tensors, path, metadata)
    return name
