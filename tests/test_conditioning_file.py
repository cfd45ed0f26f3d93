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
