"""Seeds derived from names: every random choice of a run is a pure function of (run seed, what, where),
so it does not depend on order, sharding, resumes or PYTHONHASHSEED."""

from __future__ import annotations

import hashlib
import random

import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across runs, machines and PYTHONHASHSEED)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_rng(*parts) -> random.Random:
    return random.Random(derive_seed(*parts))


def sample_generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))
