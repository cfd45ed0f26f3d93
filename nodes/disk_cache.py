"""Kosmos-G Encode's disk cache in ComfyUI: where it lives, how big it may grow, one instance per folder and size."""

from __future__ import annotations

import logging
import os

import folder_paths

from ..kosmosg_core.config import DISK_CACHE_MAX_BYTES
from ..kosmosg_core.disk_cache import DiskCache, parse_size_gib

logger = logging.getLogger(__name__)

FOLDER_NAME = "kosmosg_cache"
SIZE_VARIABLE = "KOSMOSG_DISK_CACHE_GIB"  # environment: the size limit for every workflow (0 = no disk cache)
_CACHES: dict[tuple[str, int], DiskCache] = {}  # (folder, size limit) -> its cache


def disk_cache_folder() -> str:
    """ComfyUI's internal user folder `user/__kosmosg_cache` (never served over HTTP: it holds encodings of users'
    prompts and images)."""
    if hasattr(folder_paths, "get_system_user_directory"):
        return folder_paths.get_system_user_directory(FOLDER_NAME)
    # an older ComfyUI, without system user folders: the same place, by the same rule
    return os.path.join(folder_paths.get_user_directory(), "__" + FOLDER_NAME)


def disk_cache_max_bytes() -> int:
    """KOSMOSG_DISK_CACHE_GIB if set, else DISK_CACHE_MAX_BYTES (a value that is not a size: said, and the default)."""
    text = os.environ.get(SIZE_VARIABLE, "").strip()
    if not text:
        return DISK_CACHE_MAX_BYTES
    try:
        return parse_size_gib(text)
    except ValueError as e:
        logger.warning("%s: %s; using %g GiB.", SIZE_VARIABLE, e, DISK_CACHE_MAX_BYTES / 2**30)
        return DISK_CACHE_MAX_BYTES


def shared_disk_cache() -> DiskCache | None:
    """The pack's disk cache of encodings; None when its size limit is 0."""
    folder, max_bytes = disk_cache_folder(), disk_cache_max_bytes()
    if max_bytes == 0:
        return None
    if (folder, max_bytes) not in _CACHES:
        logger.info("Kosmos-G Encode keeps encodings and image features in %s (at most %d MiB, the least recently "
                    "used go first; the node's disk_cache input or %s=0 turns it off)", folder, max_bytes >> 20,
                    SIZE_VARIABLE)
        _CACHES[(folder, max_bytes)] = DiskCache(folder, max_bytes=max_bytes)
    return _CACHES[(folder, max_bytes)]
