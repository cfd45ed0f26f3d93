"""The seeded-weight recipe shared by the official-fork output generator and the test that reads
its outputs: both sides must build bit-identical weights and inputs from a seed."""

from __future__ import annotations

import hashlib
import math
import zlib

import torch


def _unique_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) once per parameter; a tied parameter is named by its smallest alias."""
    aliases: dict[int, tuple[torch.nn.Parameter, list[str]]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), (p, []))[1].append(name)
    return sorted((min(names), p) for p, names in aliases.values())


def seeded_weights_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial weights: LayerNorm gains 1 + 0.1 N, biases 0.05 N, matrices N / sqrt(fan_in).

    Each parameter has its own generator, seeded by (seed, name): independent of registration order."""
    with torch.no_grad():
        for name, p in _unique_parameters(module):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))
    return module.eval()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over (name, shape, float32 bytes) of the unique parameters, in name order."""
    digest = hashlib.sha256()
    for name, p in _unique_parameters(module):
        digest.update(f"{name}:{tuple(p.shape)};".encode())
        digest.update(p.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def seeded_randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
