"""Output paths: checked before the work starts, written atomically with the permissions any new file gets.
Input paths too long for any file system, refused with the caller's typed error."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import socket
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import OutputExistsError, OutputPathError, first_line

if TYPE_CHECKING:  # only for annotations: the tokenizer and image readers import this module without needing torch
    import torch


WINDOWS = os.name == "nt"
# One file name: 255 bytes on the usual POSIX file systems (ext4, xfs, btrfs, APFS), 255 UTF-16 units on NTFS
NAME_MAX = 255
NAME_UNIT = "UTF-16 units" if WINDOWS else "bytes"


def _path_max() -> int:
    """A whole path's size that the OS's file calls accept, its terminating NUL included (Linux 4096, macOS
    1024 bytes; Windows: 32767 UTF-16 units with long paths on, so nothing it might accept is refused here)."""
    if WINDOWS:
        return 32767
    try:
        return os.pathconf("/", "PC_PATH_MAX")
    except (AttributeError, OSError, ValueError):
        return 4096


PATH_MAX = _path_max()
# What to do about each over-long part (`path_length_problem`), for a file that should exist and for one to write.
_INPUT_FIX = {"name": "rename the {kind}", "folder": "rename the folder", "path": "move the {kind} to a shorter path"}
_OUTPUT_FIX = {"name": "choose a shorter name", "folder": "choose a shorter folder name", "path": "choose a shorter path"}


def path_length_problem(path) -> tuple[str, str] | None:
    """(why, which part: "name" / "folder" / "path") when no file system can hold `path`, else None: its file
    name or a folder's name is over NAME_MAX, or the whole path reaches PATH_MAX. The OS refuses such a path
    in every call, exists() included, with a bare OSError (ENAMETOOLONG); checking first lets callers raise their
    own typed error instead."""
    path = Path(path)
    size = _name_length(path.name)
    if size > NAME_MAX:
        return f"the name is longer than the file system allows ({size} {NAME_UNIT}, limit {NAME_MAX})", "name"
    for folder in path.parent.parts:
        size = _name_length(folder)
        if size > NAME_MAX:
            return (f"the name of its folder {folder[:24]}... is longer than the file system allows ({size} "
                    f"{NAME_UNIT}, limit {NAME_MAX})"), "folder"
    size = _name_length(str(path))
    if size >= PATH_MAX:  # PATH_MAX counts the terminating NUL
        return f"the path is longer than the OS allows ({size} {NAME_UNIT}, limit {PATH_MAX - 1})", "path"
    return None


def _name_length(text: str) -> int:
    """The size of `text` as the OS counts it: UTF-16 units on Windows, else its bytes; text that is not valid
    Unicode (which the os calls refuse on their own) counted all the same."""
    if WINDOWS:
        return len(text.encode("utf-16-le", "surrogatepass")) // 2
    try:
        return len(os.fsencode(text))
    except UnicodeEncodeError:
        return len(text.encode("utf-8", "surrogatepass"))


def check_input_path_length(path, what: str, error: type[Exception], kind: str = "file") -> None:
    """Refuse an input path no file system can hold (`path_length_problem`) with `error` (the caller's typed
    error: CheckpointNotFoundError, ImageError...) naming it and the fix; `kind`: what the path should be ("file",
    "folder"), for the fix."""
    problem = path_length_problem(path)
    if problem:
        why, part = problem
        raise error(f"{what} {_shortened(path)}: {why}; {_INPUT_FIX[part].format(kind=kind)}.")


def _shortened(path, keep: int = 60) -> str:
    """`path` for a message: its start (the folder) and end (the file name's tail), `keep` characters each."""
    text = str(path)
    return text if len(text) <= 2 * keep + 3 else f"{text[:keep]}...{text[-keep:]}"


def check_output_file(path, what: str, inputs=(), suffix: str | None = None, suffix_why: str = "",
                      replace_fix: str | None = None) -> Path:
    """Refuse, before any work is done, an output file path that cannot be written as a file: a folder, a
    name too long, a parent that is a file or not writable, or the same file as one of `inputs` (writing
    there would destroy the input; refused first, whatever the other checks would advise).
    suffix: the ending the file must have (any case; e.g. ".safetensors"), `suffix_why` saying why.
    replace_fix: where given, an existing file is refused (OutputExistsError) with this advice ("add --overwrite");
    None: an existing file may be replaced."""
    path = _storable_path(path, what)
    try:
        if path.is_dir():
            raise OutputPathError(f"{what} {path} is a folder; give the path of a file (e.g. one inside it).")
        for source in inputs:
            # an input whose path no file system can hold is not this file (and exists() would raise on it)
            if source and path.exists() and not path_length_problem(source) and Path(source).exists() \
                    and path.samefile(source):
                raise OutputPathError(f"{what} {path} is the input file {source}; writing there would destroy it. "
                                      "Choose another output path.")
        if suffix is not None and path.suffix.lower() != suffix:
            raise OutputPathError(f"{what} {path}: {suffix_why or 'the file must end in ' + suffix}; name it "
                                  f"*{suffix}.")
        if replace_fix is not None and path.exists():
            raise OutputExistsError(f"{what} {path} already exists; {replace_fix} to replace it, or choose another "
                                    "name.")
        _check_folders(path.parent, what, path)
    except OSError as e:  # e.g. a folder on the way that this user may not enter
        if isinstance(e, OutputPathError):  # an OutputExistsError is a FileExistsError too
            raise
        raise OutputPathError(f"{what} {path}: {e.strerror or e}; choose another path.") from e
    return path


def check_output_folder(path, what: str) -> Path:
    """Refuse, before any work is done, an output folder path that is a file (or lies under one) or
    cannot be written."""
    path = _storable_path(path, what)
    try:
        _check_folders(path, what, path)
    except OSError as e:
        raise OutputPathError(f"{what} {path}: {e.strerror or e}; choose another folder.") from e
    return path


def _storable_path(path, what: str) -> Path:
    """`path` as a Path, refused when no file system can store its name: a NUL character, text that is not
    valid Unicode (a lone surrogate, e.g. from an API client's JSON), or too long (`path_length_problem`) - os
    calls raise bare ValueError / UnicodeEncodeError / OSError on them."""
    text = str(path)
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        raise OutputPathError(f"{what} {text!r} holds characters that are not valid text; choose another name.") from None
    if "\0" in text:
        raise OutputPathError(f"{what} {text!r} holds a NUL character; choose another name.")
    problem = path_length_problem(text)
    if problem:
        why, part = problem
        raise OutputPathError(f"{what} {_shortened(text)}: {why}; {_OUTPUT_FIX[part]}.")
    return Path(text)


def _check_folders(folder: Path, what: str, shown: Path) -> None:
    """The nearest existing one of `folder` and its parents must be a writable folder (the rest gets created)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise OutputPathError(f"{what} {shown}: {candidate} is a file, not a folder; choose another path.")
            if not os.access(candidate, os.W_OK | os.X_OK):
                raise OutputPathError(f"{what} {shown}: this user may not write in {candidate}; choose another "
                                      "path or change the folder's permissions.")
            try:  # what os.access cannot tell: a read-only mount, /sys or /proc (as root), a full quota of files
                probe = _new_temp_file(candidate)[0]
            except OSError as e:
                raise OutputPathError(f"{what} {shown}: no file can be written in {candidate} ({e.strerror or e}); "
                                      "choose another path.") from e
            try:
                probe.unlink()
            except OSError as e:  # e.g. an append-only folder: a finished file could not replace its temp file
                raise OutputPathError(f"{what} {shown}: files can be made in {candidate} but not removed or replaced "
                                      f"({e.strerror or e}; it keeps {probe.name}); choose another path.") from e
            return


TEMP_PREFIX = ".kosmosg-"  # temp files: .kosmosg-<pid>-<host>-<random>.tmp beside their final file (a folder
# .kosmosg-...tmpd holds what a library writes through temp files of its own: safetensors)
# Which machine wrote a temp file: on a folder shared by several machines (a multi-node run on a network
# file system) a pid means something only on its own machine.
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
# Windows: os.kill(pid, 0) would send CTRL_C_EVENT to that process group instead of checking the pid
CAN_PROBE_PIDS = os.name == "posix"
# A temp file whose writer cannot be probed (another machine's, or any on Windows) is a killed writer's once
# nothing has written to it for this long (a live writer keeps it fresh).
UNPROBED_TEMP_FILE_AGE = 24 * 3600  # seconds
_SWEPT: set[str] = set()  # folders whose stale temp files this process has removed


def _remove_stale_temp_files(folder: Path) -> None:
    """Temp files left by killed writers in `folder`, once per process: a run killed again and again must not
    fill the disk with half-written checkpoints. A writer on this machine is gone when its pid is; one whose
    pid cannot be probed here, when its file is older than UNPROBED_TEMP_FILE_AGE."""
    if str(folder) in _SWEPT:
        return
    _SWEPT.add(str(folder))
    for tmp in [*folder.glob(f"{TEMP_PREFIX}*.tmp"), *folder.glob(f"{TEMP_PREFIX}*.tmpd")]:
        try:
            pid_text, *rest = tmp.name[len(TEMP_PREFIX):].split("-")
            pid = int(pid_text)
            if not CAN_PROBE_PIDS or (len(rest) == 2 and rest[0] != HOST_TAG):
                if time.time() - tmp.stat().st_mtime > UNPROBED_TEMP_FILE_AGE:
                    _remove_temp(tmp)
                continue
            if pid != os.getpid():
                os.kill(pid, 0)  # raises ProcessLookupError when the writer is gone
        except ProcessLookupError:
            _remove_temp(tmp)
        except (ValueError, OSError):  # not ours, or a live process of another user: leave it
            pass


def _remove_temp(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def _new_temp_file(folder: Path) -> tuple[Path, int]:
    """A new empty temp file in `folder` and the permissions the OS gave it: those of any new file there
    (0666 & ~umask), learnt without os.umask, which can only read the process-wide mask by setting it."""
    while True:
        tmp = folder / f"{TEMP_PREFIX}{os.getpid()}-{HOST_TAG}-{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return tmp, stat.S_IMODE(os.stat(tmp).st_mode)


@contextlib.contextmanager
def atomic_output(path, exclusive: bool = False):
    """`with atomic_output(path) as tmp:` write to `tmp`; on success it is flushed to disk and renamed to
    `path` with the permissions any new file gets (0666 & ~umask), so a failed or killed write never
    leaves a partial file (a rerun that skips existing files would trust it) nor destroys the previous
    one. Creates the parent folder; removes temp files of killed writers there. The temp name is short:
    a 255-byte final name still works. A failed write (e.g. a full disk) is an OSError naming `path`.
    exclusive: never replace a file at `path`, even one another process put there meanwhile (FileExistsError)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(path.parent)
        tmp, new_file_mode = _new_temp_file(path.parent)
    except OSError as e:
        raise _naming(e, path) from e
    try:
        yield tmp
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(tmp, new_file_mode)  # writers that recreate the file (safetensors: 0600) do not decide
        if exclusive:
            _claim(tmp, path)
        else:
            os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if str(path) in str(e):
            raise
        raise _naming(e, path) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _claim(tmp: Path, path: Path) -> None:
    """Give `tmp` the name `path` unless a file has it (FileExistsError): a hard link is made only where the name is
    free, in one step, so two writers never take one name. Where the file system has no hard links, checked then
    renamed (a race left open there)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (FAT, some network shares)
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _naming(error: OSError, path: Path) -> OSError:
    """`error` (its errno kept) with the file being written named: a temp file's name would mean nothing."""
    return (OSError(error.errno, f"{error.strerror} (writing {path})") if error.errno and error.strerror
            else OSError(f"{error} (writing {path})"))


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` to `path` atomically (`atomic_output`). safetensors (0.8 here) creates its files with
    mode 0600 whatever the umask: a model file written so would be unreadable by, e.g., a ComfyUI service
    running as another user; atomic_output gives the usual mode."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_output(path) as tmp:
        # safetensors writes through a temp file of its own beside its target (.tmpXXXXXX, left behind by a kill):
        # its target goes in a folder named like our temp files, which the next writer's sweep removes
        workdir = tmp.with_name(tmp.name + "d")
        workdir.mkdir()
        try:
            save_file(tensors, str(workdir / "tensors"), metadata=metadata)
            os.replace(workdir / "tensors", tmp)
        except SafetensorError as e:  # e.g. no space left: an OSError like any other failed write
            raise OSError(f"cannot write {path}: {e}") from e
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return Path(path)


def utf8_text(text: str) -> str:
    """`text` as UTF-8 can hold it (safetensors metadata, JSON for other tools): a file name's undecodable bytes
    (Python keeps them as lone surrogates, which UTF-8 cannot encode) written as escapes, e.g. c\\udcff.pt."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A small .safetensors file -> (its tensors, its metadata), the tensors in memory of their own: safetensors
    maps a file's tensors from the file, and a file replaced in place while one is in use (cp, rsync --inplace)
    would then crash the process with a bus error. Raises safetensors' SafetensorError or OSError."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name).clone() for name in f.keys()}, f.metadata() or {}


def safetensors_format(path) -> str | None:
    """The "format" entry of a .safetensors file's metadata, its header only read (the pack's files say what they
    hold there); None for another suffix or a file without one. Raises ValueError naming the file when its header
    cannot be read."""
    if Path(path).suffix.lower() != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged headers
        raise ValueError(f"{path} is not a readable .safetensors file ({first_line(e)}).") from e


def write_text_atomic(path, text: str) -> Path:
    """`text` (UTF-8) -> `path` atomically: a kill never leaves it empty (runs read their record back)."""
    with atomic_output(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path, data) -> Path:
    """`data` -> `path` as JSON (indented, keys sorted: the same data gives the same bytes), atomically."""
    return write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def save_image(image, path, text: dict[str, str] | None = None, exclusive: bool = False) -> Path:
    """A PIL image -> `path` atomically (format from the suffix); `text`: PNG text chunks (name -> text);
    exclusive: a FileExistsError where a file has that name (never replaced)."""
    path = Path(path)
    image_format = path.suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG"
    options = {}
    if text:
        if image_format != "PNG":
            raise OutputPathError(f"{path}: only a .png keeps the text it was asked to carry; name it .png.")
        from PIL.PngImagePlugin import PngInfo

        options["pnginfo"] = PngInfo()
        for name, value in text.items():
            options["pnginfo"].add_itxt(name, value)  # iTXt: UTF-8, any prompt's characters
    with atomic_output(path, exclusive=exclusive) as tmp:
        image.save(tmp, format=image_format, **options)
    return path


def content_fingerprint(path, nbytes: int = 2**20, count_hidden: bool = False) -> str | None:
    """A file's content in 16 hex digits, from its size and its first and last `nbytes` (a model's header and
    tensors, a shard's first and last samples: two files of one layout differ there), so a renamed or moved copy is
    the same file and another file of the same name is not, without reading gigabytes; a folder (a diffusers model,
    a tokenizer): from each of its files, by relative name, but for hidden ones (names starting with ".", e.g.
    huggingface_hub's .cache/ of timestamped download records; `count_hidden`: counted, as versions before did).
    None: nothing to read (no such file, or a path no file system holds: the caller's own checks name the
    problem)."""
    path = Path(path)
    try:
        files = sorted(p for p in path.rglob("*") if p.is_file() and (
            count_hidden or not any(part.startswith(".") for part in p.relative_to(path).parts))) \
            if path.is_dir() else [path] if path.is_file() else []
        if not files:
            return None
        digest = hashlib.sha256()
        for file in files:
            size = file.stat().st_size
            digest.update(f"{file.relative_to(path) if path.is_dir() else ''}|{size}|".encode())
            with open(file, "rb") as f:
                digest.update(f.read(nbytes))
                f.seek(max(size - nbytes, 0))
                digest.update(f.read(nbytes))
    except (OSError, ValueError):  # e.g. a name too long, a NUL in it, a file that cannot be read
        return None
    return digest.hexdigest()[:16]


def holds_content(path, fingerprint: str) -> bool:
    """Whether `path` holds what `fingerprint` was taken of: `content_fingerprint` now, or as versions before took it
    (a folder's hidden files counted)."""
    return fingerprint in (content_fingerprint(path), content_fingerprint(path, count_hidden=True))


def sampled_fingerprint(path, blocks: int = 64, block_size: int = 2**14) -> str | None:
    """A file's content in 16 hex digits from its size and `blocks` blocks spread evenly over it (1 MiB read): two
    models of one layout that differ in any tenth of their bytes differ here with near certainty (a fine-tune of
    some layers too, which the first and last bytes may miss). None: the file cannot be read."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            digest = hashlib.sha256(str(size).encode())
            for k in range(blocks):
                file.seek(max(size - block_size, 0) * k // max(blocks - 1, 1))
                digest.update(file.read(block_size))
    except (OSError, ValueError):
        return None
    return digest.hexdigest()[:16]
