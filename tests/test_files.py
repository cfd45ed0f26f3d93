"""kosmosg_core.files.save_safetensors: atomic, and the permissions a plain `open` would give."""

import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from kosmosg_core.files import save_safetensors


@pytest.fixture
def umask():
    def set_umask(mask):
        os.umask(mask)
        return mask

    previous = os.umask(0o022)
    yield set_umask
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_file_mode_follows_the_umask(tmp_path, umask, mask):
    umask(mask)
    path = save_safetensors({"x": torch.arange(3.0)}, tmp_path / "sub" / "x.safetensors", {"k": "v"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert torch.equal(load_file(str(path))["x"], torch.arange(3.0))


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_safetensors({"x": torch.ones(2)}, tmp_path / "x.safetensors")

    def interrupted(*args):  # the temp file is written by now: fail between writing and renaming
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "chmod", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_safetensors({"x": torch.zeros(5)}, path)
    assert torch.equal(load_file(str(path))["x"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # no temp file left behind
