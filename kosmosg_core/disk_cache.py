"""Encodings kept on disk, keyed by content, so they survive restarts.

The pipeline's in-memory caches (vision features by image content, unconditional encodings by text) are
lost when the process ends; a `DiskCache` given to `KosmosGPipeline.encode` / `encode_unconditional` keeps
those and whole encodings in a folder, one small safetensors file per entry (never a pickle), written
atomically. A key is the SHA-256 of everything that decides the value: the model (its file's identity,
dtype and compute device: `checkpoint_identity` + the caller's), the token ids, the images' pixels, the
image weights and `CACHE_FORMAT`. The folder holds at most `max_bytes`; the least recently used entries
go first (the folder counted afresh every RECOUNT_SECONDS: several processes may share it). The cache is an
optimisation: a damaged entry is a miss (and removed), a failed write a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from stat import S_ISREG
from pathlib import Path

import torch

from . import __version__
from .config import DISK_CACHE_MAX_BYTES

logger = logging.getLogger(__name__)

# Part of every key: bump it when what the encoder computes for the same inputs changes (the package
# version is in the key too), so no earlier code's result is ever returned.
CACHE_FORMAT = 2  # 2: entries carry their value's SHA-256 (a flipped bit that leaves the value finite is a miss)
ENTRY_SUFFIX = ".safetensors"
TENSOR_NAME = "value"
CHECKSUM_NAME = "sha256"  # metadata: the SHA-256 of the value's bytes
MAX_ENTRY_BYTES = 64 * 2**20  # an entry is at most ~1 MB (4 prompts' [77, 768] float32): a bigger file is not one
# How long a count of the folder stands, seconds: writes within it are added to it; after it, the next write counts
# the folder again (other processes may write there too). A count of 4000 entries takes ~50 ms, more than a GPU
# encode: counting after every write would slow each one.
RECOUNT_SECONDS = 10.0
# an entry's file name: its key (64 hex digits) + ENTRY_SUFFIX, in the folder named by the key's first two digits;
# nothing else in the folder is counted or ever removed (a --cache-dir may be a folder that holds other files)
ENTRY_NAME = re.compile(r"([0-9a-f]{2})[0-9a-f]{62}" + re.escape(ENTRY_SUFFIX))


def parse_size_gib(text: str) -> int:
    """A size limit written in GiB ("1", "0.5", "0" = keep nothing) -> bytes; a ValueError saying what is wrong."""
    try:
        gib = float(text)
    except ValueError:
        gib = float("nan")
    if not 0 <= gib < float("inf"):
        raise ValueError(f"{text!r} is not a number of GiB >= 0")
    return int(gib * 2**30)


def checkpoint_identity(path) -> str:
    """A checkpoint file as a cache key part: its real path, size, modification time, status-change time and
    inode (a replaced or retrained file is another model; reading its gigabytes to hash them would cost more than
    an encode). The status-change time and inode are there because `cp -p` / `rsync -a` copy another file in with
    the old size and modification time; neither can be set back (a chmod also makes it another file: a miss)."""
    path = os.path.realpath(path)
    stat = os.stat(path)
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"


def same_file_written(identity: str, other: str) -> bool:
    """Two `checkpoint_identity` strings of the same path, size and modification time. The status-change time and
    inode also change with a hard link, a chmod, or a remount of some file systems (FUSE, FAT), none of which changes
    the weights; but also with `cp -p` of another file over it: compare a sample of the bytes then."""
    return identity.rsplit("|", 2)[0] == other.rsplit("|", 2)[0]


class DiskCache:
    """Tensors by key in `directory` (`<hash[:2]>/<hash>.safetensors`), at most `max_bytes` of them."""

    def __init__(self, directory, max_bytes: int = DISK_CACHE_MAX_BYTES):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a whole number >= 0, got {max_bytes!r}.")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._size: int | None = None  # the entries' bytes as last counted, plus what this process wrote since
        self._counted_at = 0.0  # time.monotonic() of that count
        self._last_warning = None

    @staticmethod
    def key(*parts) -> str:
        """Key parts (JSON-serialisable: strings, numbers, lists) -> the entry's key."""
        text = json.dumps([CACHE_FORMAT, __version__, *parts], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / (key + ENTRY_SUFFIX)

    def get(self, key: str) -> torch.Tensor | None:
        """The tensor stored under `key` (on the CPU), or None. Marks the entry as just used."""
        from .files import read_safetensors

        path = self._path(key)
        status = _entry_status(path)
        if status is None:
            return None
        try:  # in memory of its own: the caches keep it, and another process may replace the file meanwhile
            if status.st_size > MAX_ENTRY_BYTES:
                raise ValueError(f"it holds {status.st_size} bytes, more than any entry")
            tensors, metadata = read_safetensors(path)
            tensor = tensors[TENSOR_NAME]
            if metadata.get(CHECKSUM_NAME) != _checksum(tensor):  # a value changed on disk
                raise ValueError("its values do not match their checksum")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError("it holds inf/NaN values, which no encoding does")
        except (FileNotFoundError, PermissionError):  # removed meanwhile, or another user's in a shared folder
            return None
        except Exception as e:  # noqa: BLE001 - damaged in any way (safetensors, torch and OS errors): recompute
            now = _entry_status(path)
            if now is None or (now.st_ino, now.st_mtime_ns) != (status.st_ino, status.st_mtime_ns):
                return None  # removed or written again meanwhile by another process sharing the folder: a miss
            logger.warning("Kosmos-G disk cache: ignoring %s the damaged entry %s (%s: %s)",
                           "and removing" if _remove(path) is None else "(cannot remove)", path, type(e).__name__, e)
            return None
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:  # e.g. another user's entry in a shared folder: still a good entry
            pass
        return tensor

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Store `tensor` under `key`, then drop the least recently used entries beyond max_bytes (the folder counted
        afresh: other processes may share it). A failed write (full disk, read-only folder) is a warning, one per
        cause, not an error: nothing is lost."""
        from .files import save_safetensors

        if self.max_bytes == 0:
            return
        path = self._path(key)
        value = tensor.detach().to("cpu").contiguous()
        try:
            # the folder is the user's alone (entries are encodings of their prompts and images); a folder made
            # by someone else keeps its permissions
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if os.path.islink(path.parent):  # entries() never counts (nor evicts) what lies behind a link
                raise OSError(f"{path.parent} is a link, not a folder of the cache")
            save_safetensors({TENSOR_NAME: value}, path, metadata={CHECKSUM_NAME: _checksum(value)})
            written = path.stat().st_size
        except FileNotFoundError:  # written, then evicted at once by another process sharing the folder
            written = 0
        except OSError as e:
            cause = (type(e), e.errno)  # each entry's message names its own file: one warning per cause
            if cause != self._last_warning:
                self._last_warning = cause
                logger.warning("Kosmos-G disk cache: cannot write to %s (%s: %s); encodings are not kept across "
                               "restarts while it fails.", self.directory, type(e).__name__, e)
            return
        if self._size is None or time.monotonic() - self._counted_at > RECOUNT_SECONDS:
            self._count()
        else:
            self._size += written
        if self._size > self.max_bytes:
            self._evict()

    def put_if_missing(self, key: str, tensor: torch.Tensor) -> None:
        """`put`, unless the entry is there already (a value found in memory: written once)."""
        if self.max_bytes and _entry_status(self._path(key)) is None:
            self.put(key, tensor)

    def entries(self) -> list[tuple[Path, int]]:
        """The entry files (ENTRY_NAME only) and their sizes, least recently used first."""
        found = []
        try:
            # never through a link: what it points to is not the cache's
            subfolders = [sub.path for sub in os.scandir(self.directory)
                          if len(sub.name) == 2 and sub.is_dir(follow_symlinks=False)]
        except OSError:  # no folder yet, or not ours to read
            return []
        for subfolder in subfolders:
            try:
                listed = list(os.scandir(subfolder))
            except OSError:  # another user's in a shared folder: not counted, not removed
                continue
            for entry in listed:
                name = ENTRY_NAME.fullmatch(entry.name)
                if name is None or name.group(1) != os.path.basename(subfolder) or \
                        not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    stat = entry.stat()
                except OSError:  # removed meanwhile (another process sharing the folder)
                    continue
                found.append((stat.st_mtime_ns, Path(entry.path), stat.st_size))
        return [(path, size) for _, path, size in sorted(found)]

    def size_bytes(self) -> int:
        return sum(size for _, size in self.entries())

    def _count(self) -> None:
        self._size, self._counted_at = self.size_bytes(), time.monotonic()

    def _evict(self) -> None:
        """Remove the least recently used entries until the folder holds at most max_bytes (counted afresh:
        other processes may share it)."""
        entries = self.entries()
        total = sum(size for _, size in entries)
        for path, size in entries:
            if total <= self.max_bytes:
                break
            if _remove(path) is None:
                total -= size
        self._size, self._counted_at = total, time.monotonic()

    def clear(self) -> tuple[int, int, list[OSError]]:
        """Remove every entry listed now -> (entries removed, their bytes, why each other one could not be): entries
        another process writes meanwhile are neither removed nor counted."""
        removed, removed_bytes, failures = 0, 0, []
        for path, size in self.entries():
            failure = _remove(path)
            if failure is None:
                removed, removed_bytes = removed + 1, removed_bytes + size
            else:
                failures.append(failure)
        self._size = None
        return removed, removed_bytes, failures


def _entry_status(path: Path) -> os.stat_result | None:
    """`path`'s status if it is a regular file in a real subfolder (what this cache writes; never through a link:
    what it points to is not the cache's; a FIFO would block a read), else None (absent, or another user's)."""
    try:
        status = os.lstat(path)
        return status if S_ISREG(status.st_mode) and not os.path.islink(path.parent) else None
    except OSError:
        return None


def _checksum(tensor: torch.Tensor) -> str:
    """The SHA-256 of a tensor's bytes (its dtype and shape are checked by the caller's use)."""
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _remove(path: Path) -> OSError | None:
    """Delete an entry -> None once it is gone, else why it cannot be (another user's, a file open on Windows, a
    read-only file system): it stays."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        return e
    return None
