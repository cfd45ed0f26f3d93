"""Writing .safetensors files: atomically, with the permissions any other new file would get."""

import os
from pathlib import Path

import torch

from .errors import OutputPathError


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_file(path, what: str) -> Path:
    """Refuse, before any work is done, an output file path that cannot be written as a file."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a folder; give the path of a file (e.g. one inside it).")
    _check_folders(path.parent, what, path)
    return path


def check_output_folder(path, what: str) -> Path:
    """Refuse, before any work is done, an output folder path that is a file (or lies under one)."""
    path = Path(path)
    _check_folders(path, what, path)
    return path


def _check_folders(folder: Path, what: str, shown: Path) -> None:
    """The nearest existing one of `folder` and its parents must be a folder (the rest gets created)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise OutputPathError(f"{what} {shown}: {candidate} is a file, not a folder; choose another path.")
            return


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` to `path` via a temp file + rename, so a failed or killed write never leaves a partial file
    (nor destroys the previous one); creates the parent folder.

    safetensors (0.8 here) creates its files with mode 0600 whatever the umask; a model file written there would be
    unreadable by, e.g., a ComfyUI service running as another user. The file gets 0666 & ~umask, as `open` gives."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
