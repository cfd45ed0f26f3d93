"""Shared pytest setup: keep torch within the CI machine's cores (1 thread per worker); the tiny pack checkpoint."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import pytest  # noqa: E402

from support.tiny_kosmosg import write_tiny_pack  # noqa: E402


@pytest.fixture(scope="session")
def pack(tmp_path_factory):
    """A tiny random Kosmos-G pack .safetensors (tokenizer inside) -> (path, tokenizer dir, model); read-only."""
    return write_tiny_pack(tmp_path_factory.mktemp("pack"))
