"""Save / Load Kosmos-G conditioning as .safetensors in models/kosmosg_conditioning.

File layout (content-keyed: the name ends with a hash of the tensors, so saving the same
conditioning twice writes one file):
    tensors  "entry{i}.cond" [B, T, C], "entry{i}.pooled_output" [B, C] (if present),
             "entry{i}.<key>" for other tensor-valued keys (e.g. mask)
    metadata {"format": "kosmosg_conditioning", "format_version": "1",
              "entries": JSON list of each entry's JSON-serialisable keys}
Keys holding live objects (ControlNet, hooks) are not saved: re-apply those nodes after loading.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import comfy.model_management as mm
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..kosmosg_core.files import save_safetensors
from . import paths
from .types import CATEGORY

logger = logging.getLogger(__name__)

FORMAT_NAME = "kosmosg_conditioning"
FORMAT_VERSION = "1"


def _json_safe(value):
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def conditioning_to_file_content(conditioning) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, entries = {}, []
    for i, (cond, extras) in enumerate(conditioning):
        tensors[f"entry{i}.cond"] = cond.detach().to("cpu", torch.float32).contiguous()
        plain, dropped = {}, []
        for key, value in extras.items():
            if isinstance(value, torch.Tensor):
                tensors[f"entry{i}.{key}"] = value.detach().cpu().contiguous()
            elif _json_safe(value):
                plain[key] = value
            else:
                dropped.append(key)
        if dropped:
            logger.warning("Kosmos-G Save Conditioning: not saving %s (live objects); re-apply those nodes after "
                           "loading.", ", ".join(dropped))
        entries.append(plain)
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "entries": json.dumps(entries)}
    return tensors, metadata


def content_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(str(tensors[name].dtype).encode() + repr(tuple(tensors[name].shape)).encode())
        digest.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_conditioning_file(path: str) -> list:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"Cannot read conditioning file {path}: {e}. Save it again with Kosmos-G Save "
                         "Conditioning.") from e
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a Kosmos-G conditioning file (metadata format {metadata.get('format')!r}); "
                         "only files written by Kosmos-G Save Conditioning can be loaded.")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has conditioning format version {metadata.get('format_version')!r}; this pack "
                         f"reads version {FORMAT_VERSION}.")
    entries = json.loads(metadata.get("entries", "[]"))
    device = mm.intermediate_device()
    conditioning = []
    for i, plain in enumerate(entries):
        prefix = f"entry{i}."
        extras = dict(plain)
        for name, tensor in tensors.items():
            if name.startswith(prefix) and name != prefix + "cond":
                extras[name[len(prefix):]] = tensor.to(device)
        conditioning.append([tensors[prefix + "cond"].to(device), extras])
    return conditioning


class KosmosGSaveConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KosmosGSaveConditioning",
            display_name="Kosmos-G Save Conditioning",
            category=CATEGORY,
            description=(
                "Saves a conditioning (e.g. Kosmos-G Encode's positive) as a .safetensors file in "
                "models/kosmosg_conditioning, named <prefix>_<content hash>, so a subject can be reused later without "
                "the Kosmos-G model. Identical conditionings map to the same file. ControlNet/hook attachments are "
                "not saved."),
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="Conditioning to save."),
                io.String.Input("filename_prefix", default="kosmosg",
                                tooltip="Start of the file name; a hash of the content is appended."),
            ],
            outputs=[io.String.Output(display_name="filename",
                                      tooltip="Name of the saved file, as Kosmos-G Load Conditioning lists it.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, conditioning, filename_prefix="kosmosg") -> io.NodeOutput:
        prefix = (filename_prefix or "kosmosg").strip()
        if os.path.basename(prefix) != prefix or prefix in (".", ".."):
            raise ValueError(f"filename_prefix {filename_prefix!r} must be a plain name (no folders).")
        tensors, metadata = conditioning_to_file_content(conditioning)
        name = f"{prefix}_{content_hash(tensors, metadata)[:16]}.safetensors"
        folder = folder_paths.get_folder_paths(paths.CONDITIONING_FOLDER)[0]
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            save_safetensors(tensors, path, metadata)
        return io.NodeOutput(name, ui=ui.PreviewText(f"Saved {name}"))


class KosmosGLoadConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KosmosGLoadConditioning",
            display_name="Kosmos-G Load Conditioning",
            category=CATEGORY,
            description="Loads a conditioning saved by Kosmos-G Save Conditioning from models/kosmosg_conditioning.",
            inputs=[
                io.Combo.Input("conditioning_file",
                               options=paths.list_files(paths.CONDITIONING_FOLDER, paths.CONDITIONING_EXTENSIONS),
                               tooltip="A file written by Kosmos-G Save Conditioning."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning", tooltip="The saved conditioning.")],
        )

    @classmethod
    def validate_inputs(cls, conditioning_file):
        if folder_paths.get_full_path(paths.CONDITIONING_FOLDER, conditioning_file or "") is None:
            return paths.missing_file_message(
                paths.CONDITIONING_FOLDER, conditioning_file, "Conditioning file",
                "Create one with Kosmos-G Save Conditioning (it writes to ComfyUI/models/kosmosg_conditioning/).")
        return True

    @classmethod
    def fingerprint_inputs(cls, conditioning_file):
        return paths.file_fingerprint(folder_paths.get_full_path(paths.CONDITIONING_FOLDER, conditioning_file or ""))

    @classmethod
    def execute(cls, conditioning_file) -> io.NodeOutput:
        path = folder_paths.get_full_path(paths.CONDITIONING_FOLDER, conditioning_file)
        if path is None:
            raise FileNotFoundError(paths.missing_file_message(
                paths.CONDITIONING_FOLDER, conditioning_file, "Conditioning file",
                "Create one with Kosmos-G Save Conditioning."))
        return io.NodeOutput(read_conditioning_file(path))
