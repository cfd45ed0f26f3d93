"""kosmosg_core.conditioning_file without ComfyUI: CONDITIONING values round-trip through .safetensors."""

import pytest
import torch
from safetensors.torch import save_file

from kosmosg_core.conditioning_file import read_conditioning_file, save_conditioning
from kosmosg_core.errors import ConditioningFileError


def test_round_trip_keeps_data_and_drops_live_objects(tmp_path):
    cond = torch.randn(2, 77, 8)
    extras = {"pooled_output": cond.mean(dim=1), "area": (8, 8, 0, 0), "strength": 0.7,
              "nested": {"latents": [torch.ones(1, 4)]}, "control": object()}
    name = save_conditioning([[cond, extras]], tmp_path, "subject")
    assert name.startswith("subject_") and name.endswith(".safetensors")
    (loaded_cond, loaded), = read_conditioning_file(tmp_path / name)
    assert torch.equal(loaded_cond, cond) and torch.equal(loaded["pooled_output"], extras["pooled_output"])
    assert loaded["area"] == (8, 8, 0, 0) and loaded["strength"] == 0.7  # a tuple stays a tuple
    assert torch.equal(loaded["nested"]["latents"][0], torch.ones(1, 4))
    assert "control" not in loaded
    assert save_conditioning([[cond, extras]], tmp_path, "subject") == name  # content-keyed
    assert save_conditioning([[cond * 2, extras]], tmp_path, "subject") != name


def test_bad_files_and_requests_name_the_problem(tmp_path):
    with pytest.raises(ConditioningFileError, match="plain name"):
        save_conditioning([[torch.zeros(1, 2, 3), {}]], tmp_path, "../up")
    with pytest.raises(ConditioningFileError, match="empty"):
        save_conditioning([], tmp_path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "something"})
    with pytest.raises(ConditioningFileError, match="not a Kosmos-G conditioning file"):
        read_conditioning_file(tmp_path / "other.safetensors")
    save_file({"cond": torch.full((1, 4, 3), float("nan"))}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ConditioningFileError, match="inf/NaN"):
        read_conditioning_file(tmp_path / "nan.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ConditioningFileError, match="Cannot read conditioning file"):
        read_conditioning_file(tmp_path / "cut.safetensors")


def test_keys_named_like_a_tag_are_left_out_with_the_reason_and_the_file_still_loads(tmp_path, caplog):
    """A key "__tensor__" / "__tuple__" would read back as the file format's tag: an entry holding only
    {"__tensor__": "x"} was saved, then refused on loading as damaged (lost work). Such keys are left out, and
    the warning says why; live objects keep their own reason."""
    cond = torch.randn(1, 77, 8)
    for extras in ({"__tensor__": "x"}, {"__tuple__": [1, 2], "strength": 0.5}):
        with caplog.at_level("WARNING", logger="kosmosg_core.conditioning_file"):
            caplog.clear()
            name = save_conditioning([[cond, extras]], tmp_path)
        (loaded_cond, loaded), = read_conditioning_file(tmp_path / name)
        assert torch.equal(loaded_cond, cond)
        assert loaded == {key: value for key, value in extras.items() if not key.startswith("__")}
        assert "reserves the keys" in caplog.text and "rename that key" in caplog.text
    extras = {"meta": {"__tuple__": [1]}, "kept": {"a": (1, 2)}, "control": object()}
    with caplog.at_level("WARNING", logger="kosmosg_core.conditioning_file"):
        caplog.clear()
        name = save_conditioning([[cond, extras]], tmp_path)
    (_, loaded), = read_conditioning_file(tmp_path / name)
    assert loaded == {"kept": {"a": (1, 2)}}
    assert "'meta' (the file format reserves" in caplog.text and "'control' (a live object" in caplog.text


def test_entries_sharing_a_tensor_save_and_load(tmp_path):
    """Found by a review: ConditioningCombine of a conditioning with an area (or timestep) version of itself holds
    one `cond` tensor twice, which safetensors refuses to write ("Some tensors share memory"): nothing was saved.
    A view of a tensor another value holds (a batch row) is the same case."""
    cond = torch.randn(2, 77, 8)
    pooled = cond.mean(dim=1)
    conditioning = [[cond, {"pooled_output": pooled}], [cond, {"pooled_output": pooled, "area": (8, 8, 0, 0)}],
                    [cond[:1], {"pooled_output": pooled[:1], "mask": cond[0]}]]
    name = save_conditioning(conditioning, tmp_path)
    loaded = read_conditioning_file(tmp_path / name)
    for (want_cond, want), (got_cond, got) in zip(conditioning, loaded):
        assert torch.equal(got_cond, want_cond) and got.keys() == want.keys()
        assert all(torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v for k, v in want.items())


def test_loaded_tensors_survive_the_file_being_overwritten_in_place(tmp_path):
    """Found by a review: loaded tensors were mapped from the file, so a file truncated or rewritten in place while
    ComfyUI kept the output (cp over it, rsync --inplace, another machine evicting a shared cache entry) crashed the
    process with a bus error on the next use. In a subprocess: the old behaviour kills it."""
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import sys, torch
sys.path[:0] = [{str(Path(__file__).parents[1])!r}]
from kosmosg_core.conditioning_file import read_conditioning_file, save_conditioning
from kosmosg_core.disk_cache import DiskCache
folder = {str(tmp_path)!r}
cond = torch.randn(1, 77, 8)
name = save_conditioning([[cond, {{"pooled_output": cond.mean(1)}}]], folder)
(loaded, extras), = read_conditioning_file(folder + "/" + name)
cache = DiskCache(folder + "/cache")
key = DiskCache.key("entry")
cache.put(key, torch.randn(64, 16))
entry = cache.get(key)
for path in (folder + "/" + name, *[str(p) for p, _ in cache.entries()]):
    open(path, "wb").close()  # truncated in place
print(float(loaded.sum() + extras["pooled_output"].sum() + entry.sum()) == float(loaded.sum() + extras["pooled_output"].sum() + entry.sum()))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.strip() == "True"


def test_save_rewrites_a_file_of_its_name_whose_values_were_damaged(tmp_path):
    """Found by a review: a file of the content-keyed name was kept when its metadata matched, so a value damaged
    on disk stayed: Load refused it ("encode the subject again and save that"), and saving again said "saved" and
    changed nothing."""
    import json
    import struct

    conditioning = [[torch.randn(1, 77, 8), {}]]
    name = save_conditioning(conditioning, tmp_path)
    data = bytearray((tmp_path / name).read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]  # the tensor data, after the header
    assert "entry0.cond" in json.loads(data[8:start])
    data[start:start + 4] = struct.pack("<f", float("nan"))
    (tmp_path / name).write_bytes(bytes(data))
    with pytest.raises(ConditioningFileError, match="inf/NaN"):
        read_conditioning_file(tmp_path / name)
    assert save_conditioning(conditioning, tmp_path) == name
    assert torch.equal(read_conditioning_file(tmp_path / name)[0][0], conditioning[0][0])


@pytest.mark.parametrize("entries, tensors, message", [
    ([{"pooled_output": {"__tensor__": ["x"]}}], {}, r"entry 0: it refers to a tensor \"\['x'\]\" the file does not"),
    ([{"pooled_output": {"__tensor__": 3}}], {}, "entry 0: it refers to a tensor '3' the file does not hold"),
    ([{"area": {"__tuple__": 5}}], {}, "entry 0: a tuple is written as int, not a list"),
    ([{"__tuple__": [1, 2]}], {}, "entry 0: its keys are written as tuple, not a mapping"),
    ([{"__tensor__": "entry0.cond"}], {}, "entry 0: its keys are written as Tensor, not a mapping"),
    ([{"pooled_output": {"__tensor__": "entry0.p"}}], {"entry0.p": torch.zeros(3, 5, dtype=torch.int64)},
     r"entry 0: pooled_output is torch.int64 \[3, 5\], not a \[batch, channels\] float tensor"),
    ([{"pooled_output": [1, 2]}], {}, "entry 0: pooled_output is list, not a"),
    ([{"mask": 1.5}], {}, "entry 0: mask is float, not a tensor"),
])
def test_damaged_entries_are_refused_by_name(tmp_path, entries, tensors, message):
    """Found by a review: these were bare TypeErrors, or loaded and then failed in ComfyUI's nodes (which copy each
    entry's keys as a dict and take pooled_output as [B, C] floats)."""
    import json

    path = tmp_path / "damaged.safetensors"
    save_file({"entry0.cond": torch.randn(1, 77, 8), **tensors}, str(path),
              metadata={"format": "kosmosg_conditioning", "format_version": "2", "entries": json.dumps(entries)})
    with pytest.raises(ConditioningFileError, match=f"damaged.safetensors is damaged: {message}"):
        read_conditioning_file(path)


def test_float8_conds_and_a_blank_prefix(tmp_path):
    """Found by a review: a float8 cond was a bare NotImplementedError (torch has no isfinite for it); a prefix of
    white space named files "_<hash>" instead of taking the default."""
    save_file({"cond": torch.randn(1, 4, 3).to(torch.float8_e4m3fn)}, str(tmp_path / "f8.safetensors"))
    with pytest.raises(ConditioningFileError, match=r"float8_e4m3fn \[1, 4, 3\], not a .*float16/bfloat16/float32"):
        read_conditioning_file(tmp_path / "f8.safetensors")
    assert save_conditioning([[torch.randn(1, 4, 3), {}]], tmp_path, "  ").startswith("kosmosg_")


def test_a_fifo_is_refused_not_read_forever(tmp_path):
    """Found by a review: read_conditioning_file blocked forever on a FIFO (the node checks first; API callers not)."""
    import os

    fifo = tmp_path / "cond.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ConditioningFileError, match=r"cond\.safetensors is not a regular file"):
        read_conditioning_file(fifo)


def test_every_tensor_goes_to_the_device_dropped_keys_leave_no_tensor_and_the_shape_is_in_the_name(tmp_path):
    """Found by a mutation review, each untested: extra tensors (pooled_output) read onto the requested device like
    `cond`; a key left out (a live object beside tensors) keeps none of its tensors in the file; two conditionings
    with the same bytes in another shape get other file names (the content hash covers dtype and shape)."""
    from safetensors import safe_open

    from kosmosg_core.conditioning_file import conditioning_to_file_content, content_hash

    cond = torch.randn(1, 77, 8)
    name = save_conditioning([[cond, {"pooled_output": cond[:, 0], "gone": [torch.ones(3), object()]}]], tmp_path)
    with safe_open(str(tmp_path / name), framework="pt") as handle:
        assert sorted(handle.keys()) == ["entry0.cond", "entry0.pooled_output"]
    (loaded_cond, loaded), = read_conditioning_file(tmp_path / name, device="meta")
    assert loaded_cond.device.type == "meta" and loaded["pooled_output"].device.type == "meta"
    assert "gone" not in loaded
    flat = conditioning_to_file_content([[torch.arange(24.0).reshape(1, 4, 6), {}]])
    other_shape = conditioning_to_file_content([[torch.arange(24.0).reshape(1, 6, 4), {}]])
    assert content_hash(*flat) != content_hash(*other_shape)
