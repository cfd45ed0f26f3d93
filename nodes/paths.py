"""Model folders: `models/kosmosg` for checkpoints, `models/kosmosg_conditioning` for saved conditionings.

Registered the way IPAdapter_plus registers `models/ipadapter`: a folder already created by the
user's `extra_model_paths.yaml` keeps its paths, only the extension filter is set.
"""

from __future__ import annotations

import os

import folder_paths

from ..kosmosg_core.disk_cache import checkpoint_identity
from ..kosmosg_core.errors import CheckpointNotFoundError
from ..kosmosg_core.files import path_length_problem
from ..kosmosg_core.tokenizer import TOKENIZER_FILENAMES, tokenizer_places_text

CHECKPOINT_FOLDER = "kosmosg"
CONDITIONING_FOLDER = "kosmosg_conditioning"
CHECKPOINT_EXTENSIONS = {".pt", ".safetensors"}
OFFICIAL_EXTENSIONS = {".pt"}
CONDITIONING_EXTENSIONS = {".safetensors"}


def register_folder(name: str, extensions: set[str]) -> None:
    """ComfyUI's `models/<name>` plus any folders extra_model_paths.yaml lists under a `<name>:` key (ComfyUI reads
    the yaml before it imports custom nodes, so those come first here; the default folder is kept: the README and
    every "not found" message send users there)."""
    default = os.path.join(folder_paths.models_dir, name)
    listed = list(folder_paths.folder_names_and_paths.get(name, ([], set()))[0])
    folder_paths.folder_names_and_paths[name] = ([default, *(p for p in listed if p != default)], set(extensions))


def register_folders() -> None:
    register_folder(CHECKPOINT_FOLDER, CHECKPOINT_EXTENSIONS)
    register_folder(CONDITIONING_FOLDER, CONDITIONING_EXTENSIONS)


def list_files(folder: str, extensions: set[str] | None = None) -> list[str]:
    names = folder_paths.get_filename_list(folder)
    if extensions is not None:
        names = [n for n in names if os.path.splitext(n)[1].lower() in extensions]
    return sorted(names)


def listed_file(folder: str, name) -> str | None:
    """The full path of `name` in `folder` when it is a file the folder's list offers (a file name with one of
    the folder's extensions, any case), else None (also for a non-text value from an API prompt)."""
    extensions = folder_paths.folder_names_and_paths.get(folder, ([], set()))[1]
    if not isinstance(name, str) or not name.lower().endswith(tuple(e.lower() for e in extensions)):
        return None
    return folder_paths.get_full_path(folder, name)


def missing_file_message(folder: str, name: str, what: str, how: str) -> str:
    """'X not found; searched A, B; found: ...; put ... there' — the error users of this pack see."""
    searched = ", ".join(folder_paths.get_folder_paths(folder)) or f"(no '{folder}' folder registered)"
    found = list_files(folder)
    found_text = ", ".join(found[:10]) + (" ..." if len(found) > 10 else "") if found else "nothing"
    # e.g. an API prompt's name over 255 bytes: no file can have it, say so (ComfyUI's lookup just finds nothing)
    problem = path_length_problem(name) if isinstance(name, str) else None
    reason = f": {problem[0]}" if problem else ""
    return (f"{what} {name!r} was not found{reason}. Searched: {searched} (found: {found_text}). {how} "
            f"Other locations can be added under a '{folder}:' key in extra_model_paths.yaml; "
            "press R in the UI to refresh the file lists.")


def checkpoint_input_problem(name) -> str | bool:
    """A node's validate_inputs for a checkpoint combo: True, or where to put the file (in place of ComfyUI's "Value
    not in list"). Not given at all (an API prompt, None): True, ComfyUI reports the missing input itself."""
    if name is not None and listed_file(CHECKPOINT_FOLDER, name) is None:
        return checkpoint_missing_message(name)
    return True


def checkpoint_missing_message(name: str) -> str:
    return missing_file_message(
        CHECKPOINT_FOLDER, name, "Kosmos-G checkpoint",
        f"Put the official checkpoint_final.pt (with {' + '.join(TOKENIZER_FILENAMES)} in {tokenizer_places_text()}) "
        "or a converted Kosmos-G .safetensors (tokenizer inside) into ComfyUI/models/kosmosg/.")


def _resolve_file(folder: str, name: str, missing_message, error=FileNotFoundError) -> str:
    """The full path of the file `name` in `folder`, else `error(missing_message(name))`."""
    path = folder_paths.get_full_path(folder, name) if name else None
    if path is None or not os.path.isfile(path):
        raise error(missing_message(name))
    return path


def resolve_checkpoint(name: str) -> str:
    return _resolve_file(CHECKPOINT_FOLDER, name, checkpoint_missing_message, CheckpointNotFoundError)


def conditioning_missing_message(name: str) -> str:
    return missing_file_message(
        CONDITIONING_FOLDER, name, "Conditioning file",
        "Create one with Kosmos-G Save Conditioning (it writes to ComfyUI/models/kosmosg_conditioning/) or "
        "`python -m kosmosg_core encode --out`.")


def resolve_conditioning(name: str) -> str:
    return _resolve_file(CONDITIONING_FOLDER, name, conditioning_missing_message)


def file_fingerprint(path: str | None) -> str:
    """Changes when the file is replaced or rewritten (for ComfyUI's re-run check)."""
    if path is None or not os.path.exists(path):
        return "missing"
    return checkpoint_identity(path)


def checkpoint_fingerprint(path: str | None) -> str:
    """Changes when the checkpoint, or a file its loading reads besides (an official .pt's tokenizer files and
    sidecar config), is replaced or rewritten: the Loader then opens it again."""
    from ..kosmosg_core.checkpoint import checkpoint_files
    from ..kosmosg_core.errors import KosmosGError

    try:
        files = checkpoint_files(path) if path is not None else []
    except (KosmosGError, OSError):  # unreadable: the Loader's run says why
        return file_fingerprint(path)
    return "|".join(file_fingerprint(str(file)) for file in files) or "missing"
