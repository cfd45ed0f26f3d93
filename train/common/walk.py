"""Listing the files under a folder, the one way train/ does it."""

from __future__ import annotations

import os

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # the image files train/ reads from folders


def files_under(folder: str | os.PathLike, suffixes: tuple[str, ...]) -> list[str]:
    """Sorted paths, relative to `folder`, of the files below it whose name ends with one of `suffixes`
    (any case). Symlinked folders are followed (a dataset assembled from links is common), each real
    folder once, so a link cycle cannot loop."""
    suffixes = tuple(s.lower() for s in suffixes)
    seen, found = set(), []
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        found += [os.path.relpath(os.path.join(root, name), folder) for name in files if name.lower().endswith(suffixes)]
    return sorted(found)
