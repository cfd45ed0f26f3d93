"""The restricted `.pt` loader: exact tensors, lazy storages, inert foreign objects, refused code."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from kosmosg_core.config import KosmosGConfig
from kosmosg_core.errors import CheckpointError, CheckpointNotFoundError, UnsafeCheckpointError
from kosmosg_core.safe_unpickle import LazyTensor, PickledObject, load_pt_state_dict, safe_load
from support.official_checkpoint import (
    PAYLOADS,
    build_official_state_dict,
    make_malicious_checkpoint,
    save_official_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(path, state dict) of a tiny fp32 official-format checkpoint with full training state."""
    sd = build_official_state_dict(KosmosGConfig.tiny(), seed=0)
    path = save_official_checkpoint(tmp_path_factory.mktemp("official") / "checkpoint_final.pt", sd)
    return path, sd


def _unique_storages(sd: dict) -> dict[int, int]:
    """data_ptr -> nbytes of the distinct storages behind `sd` (what torch.save writes as records)."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in sd.values()}


# --- hand-written pickles inside a torch zip -----------------------------------------------------
class FakeStorage:
    """Written by `_StoragePickler` as torch's persistent id ("storage", type, key, location, numel)."""

    def __init__(self, key: str, numel: int, storage_type=torch.FloatStorage):
        self.key, self.numel, self.storage_type = key, numel, storage_type


class RawReduce:
    """Pickles as REDUCE(func, args) for any importable func (to write hostile / odd records)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class _StoragePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def write_torch_zip(path: Path, obj=None, records: dict[str, bytes] | None = None, pickle_bytes: bytes | None = None,
                    byteorder: str = "little") -> Path:
    """A zip laid out like torch.save's (`archive/data.pkl`, `archive/data/<key>`, `archive/byteorder`)."""
    if pickle_bytes is None:
        buffer = io.BytesIO()
        _StoragePickler(buffer, protocol=2).dump(obj)
        pickle_bytes = buffer.getvalue()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/byteorder", byteorder)
        for key, data in (records or {}).items():
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", "3\n")
    return path


def tensor_record(storage: FakeStorage, offset=0, size=(2,), stride=(1,)) -> RawReduce:
    return RawReduce(torch._utils._rebuild_tensor_v2, storage, offset, size, stride, False, collections.OrderedDict())


# --- round trip ----------------------------------------------------------------------------------
def test_fixture_loads_with_identical_tensors(official):
    path, sd = official
    loaded = load_pt_state_dict(path)
    assert list(loaded) == list(sd)
    for name, tensor in sd.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name


def test_tied_embedding_storage_stays_shared(official):
    path, _ = official
    loaded = load_pt_state_dict(path)
    embed = loaded["gpt_model.decoder.embed_tokens.weight"]
    head = loaded["gpt_model.decoder.output_projection.weight"]
    assert embed.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    embed[0, 0] = 123.0
    assert head[0, 0] == 123.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files(tmp_path, dtype):
    sd = build_official_state_dict(KosmosGConfig.tiny(), seed=3, dtype=dtype)
    path = save_official_checkpoint(tmp_path / "half.pt", sd)
    loaded = load_pt_state_dict(path)
    assert all(loaded[k].dtype == dtype and torch.equal(loaded[k], v) for k, v in sd.items())


def test_views_with_offsets_and_strides(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {"t": base.t(), "row": base[2], "col": base[:, 3], "same": base, "empty": torch.empty(0, 5)}
    torch.save({"model": sd}, tmp_path / "views.pt")
    loaded = load_pt_state_dict(tmp_path / "views.pt")
    for name, tensor in sd.items():
        assert loaded[name].shape == tensor.shape and loaded[name].stride() == tensor.stride(), name
        assert torch.equal(loaded[name], tensor), name


def test_big_endian_records_are_byteswapped(tmp_path, official):
    path, sd = official
    itemsize = {}

    def collect(obj):
        if isinstance(obj, LazyTensor):
            itemsize[obj.storage.key] = obj.dtype.itemsize
        elif isinstance(obj, dict):
            for value in obj.values():
                collect(value)

    collect(safe_load(path)["model"])
    swapped = tmp_path / "big.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(swapped, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            key = info.filename.rpartition("/data/")[2] if "/data/" in info.filename else None
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif key in itemsize:
                data = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(-1, itemsize[key]).flip(-1).numpy().tobytes()
            dst.writestr(info.filename, data)
    loaded = load_pt_state_dict(swapped)
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


# --- why a restricted unpickler ------------------------------------------------------------------
def test_weights_only_torch_load_refuses_the_official_layout(official):
    path, _ = official
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_foreign_objects_become_inert_records(official):
    path, _ = official
    tree = safe_load(path)
    cfg = tree["cfg"]
    assert isinstance(cfg, PickledObject) and type(cfg).pickle_ref == "omegaconf.dictconfig.DictConfig"
    assert "_content" in cfg.state  # BUILD state recorded, nothing run
    best = tree["extra_state"]["best"]  # a numpy.float64: REDUCE of numpy's scalar(), recorded not run
    assert isinstance(best, PickledObject) and type(best).pickle_ref.endswith("multiarray.scalar")
    assert tree["optimizer_history"][0]["num_updates"] == 123
    assert tree["extra_state"]["train_iterator"]["iterations_in_epoch"] == 123
    exp_avg = tree["last_optimizer_state"]["state"][0]["exp_avg"]
    assert isinstance(exp_avg, LazyTensor) and exp_avg.dtype == torch.float32
    assert tree["last_optimizer_state"]["param_groups"][0]["betas"] == (0.9, 0.98)


def test_omegaconf_is_never_imported(official):
    path, _ = official
    script = textwrap.dedent(f"""
        import sys
        from kosmosg_core.safe_unpickle import load_pt_state_dict, safe_load
        before = sorted(m for m in sys.modules if m.split('.')[0] == 'omegaconf')
        load_pt_state_dict({str(path)!r}); safe_load({str(path)!r})
        after = sorted(m for m in sys.modules if m.split('.')[0] == 'omegaconf')
        import omegaconf  # installed: the file's DictConfig could have been built, but was not
        print(before, after)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=SUBPROCESS_ENV,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] []"


def test_safe_load_materializes_on_demand(official):
    path, sd = official
    tree = safe_load(path)  # the file is closed again; materialize() reopens it
    embed = tree["model"]["gpt_model.decoder.embed_tokens.weight"]
    head = tree["model"]["gpt_model.decoder.output_projection.weight"]
    assert embed.shape == tuple(sd["gpt_model.decoder.embed_tokens.weight"].shape) and embed.storage is head.storage
    assert torch.equal(embed.materialize(), sd["gpt_model.decoder.embed_tokens.weight"])
    trusted = torch.load(path, weights_only=False)  # our own fixture: plain load is fine here
    exp_avg = tree["last_optimizer_state"]["state"][3]["exp_avg"].materialize()
    assert torch.equal(exp_avg, trusted["last_optimizer_state"]["state"][3]["exp_avg"])


def test_only_model_storages_are_read(official, monkeypatch):
    path, sd = official
    tree = safe_load(path)
    optimizer_bytes = sum(t.numel() * t.dtype.itemsize for s in tree["last_optimizer_state"]["state"].values()
                          for t in s.values() if isinstance(t, LazyTensor))
    opened = []
    real_open = zipfile.ZipFile.open

    def recording_open(self, name, *args, **kwargs):
        info = name if isinstance(name, zipfile.ZipInfo) else self.getinfo(name)
        opened.append(info)
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", recording_open)
    load_pt_state_dict(path)
    data_records = [i for i in opened if "/data/" in i.filename]
    expected = _unique_storages(sd)
    assert len(data_records) == len({i.filename for i in data_records}) == len(expected)
    assert sum(i.file_size for i in data_records) == sum(expected.values())
    assert optimizer_bytes > sum(expected.values())  # the skipped part is the larger one


def test_include_filter_skips_reading_unused_tensors(official, monkeypatch):
    path, sd = official
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open",
                        lambda self, name, *a, **k: opened.append(name) or real_open(self, name, *a, **k))
    keep = lambda name: not name.startswith(("diffusion_unet.", "vae."))  # noqa: E731
    loaded = load_pt_state_dict(path, include=keep)
    assert set(loaded) == {k for k in sd if keep(k)}
    kept = {k: v for k, v in sd.items() if keep(k)}
    assert len([n for n in opened if "/data/" in str(n)]) == len(_unique_storages(kept))


# --- malicious files -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def malicious(tmp_path_factory):
    """{(payload, where): (file, marker path)} — files are written once; markers must never appear."""
    root = tmp_path_factory.mktemp("malicious")
    files = {}
    for payload in [*PAYLOADS, "setstate"]:
        for where in ("extra_state", "model", "last_optimizer_state"):
            marker = root / f"marker-{payload}-{where}"
            files[(payload, where)] = (make_malicious_checkpoint(root / f"{payload}-{where}.pt", payload, marker, where),
                                       marker)
    return files


def test_malicious_files_really_run_code_under_plain_torch_load(malicious, tmp_path):
    """The payloads are real: plain unpickling (in a child process) writes every marker."""
    jobs = [(str(path), str(tmp_path / f"plain-{payload}-{where}"), payload, where)
            for (payload, where), (path, _) in malicious.items() if where == "extra_state"]
    script = textwrap.dedent("""
        import json, shutil, sys, torch
        for path, marker, payload, where in json.loads(sys.argv[1]):
            copy = marker + '.pt'
            shutil.copy(path, copy)
            torch.load(copy, weights_only=False)  # writes the marker named inside the pickle
    """)
    result = subprocess.run([sys.executable, "-c", script, json.dumps(jobs)], capture_output=True, text=True,
                            env=SUBPROCESS_ENV, timeout=120)
    assert result.returncode == 0, result.stderr
    for (payload, where), (_, marker) in malicious.items():
        if where == "extra_state":
            assert marker.exists(), f"plain torch.load did not run the {payload} payload"
            marker.unlink()


@pytest.mark.parametrize("payload,ref", [("os_system", ".system"), ("eval", "builtins.eval"),
                                         ("subprocess", "subprocess.call"),
                                         ("function", "official_checkpoint.write_marker")])
@pytest.mark.parametrize("where", ["extra_state", "model", "last_optimizer_state"])
def test_malicious_files_are_refused_without_side_effects(malicious, payload, ref, where):
    path, marker = malicious[(payload, where)]
    marker.unlink(missing_ok=True)
    for load in (load_pt_state_dict, safe_load):
        with pytest.raises(UnsafeCheckpointError) as error:
            load(path)
        message = str(error.value)
        assert str(path) in message and ref in message and "trust" in message
        assert not marker.exists()


def test_side_effecting_setstate_class_stays_inert(malicious):
    # Plain pickle would import the class and run its __setstate__ (NEWOBJ + BUILD); we record it.
    path, marker = malicious[("setstate", "extra_state")]
    marker.unlink(missing_ok=True)
    tree = safe_load(path)
    evil = tree["extra_state"]["evil"]
    assert isinstance(evil, PickledObject) and type(evil).pickle_ref.endswith("official_checkpoint.MarkerOnSetstate")
    assert evil.state == {"marker": str(marker)}
    assert not marker.exists()
    assert "evil" not in load_pt_state_dict(malicious[("setstate", "model")][0])  # non-tensor entry dropped


def test_protocol_4_stack_global_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "p4.pt"
    torch.save({"model": {}, "x": PAYLOADS["eval"](marker)}, path, pickle_protocol=4)
    with pytest.raises(UnsafeCheckpointError, match="builtins.eval"):
        load_pt_state_dict(path)
    assert not marker.exists()


def test_protocol_0_inst_opcode_is_refused(tmp_path):
    # INST calls the named class/function with the marked arguments: `os.system('...')`.
    marker = tmp_path / "marker"
    payload = f"(S'echo pwned > \"{marker}\"'\nios\nsystem\n.".encode()
    path = write_torch_zip(tmp_path / "inst.pt", pickle_bytes=b"(dS'model'\n(dsS'x'\n" + payload[:-1] + b"s.")
    with pytest.raises(UnsafeCheckpointError, match=r"os\.system"):
        safe_load(path)
    assert not marker.exists()


def test_python2_builtin_names_are_mapped_then_refused(tmp_path):
    pkl = b"\x80\x02c__builtin__\neval\nX\x03\x00\x00\x001+1\x85R."
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.eval"):
        safe_load(write_torch_zip(tmp_path / "py2.pt", pickle_bytes=pkl))


def test_copyreg_reconstructor_only_builds_placeholders(tmp_path):
    import copyreg

    # protocol 1 pickles plain objects as copyreg._reconstructor(cls, object, None) + BUILD
    from support.official_checkpoint import MarkerOnSetstate

    marker = tmp_path / "marker"
    pkl = pickle.dumps({"model": {}, "cfg": MarkerOnSetstate(marker)}, protocol=1)
    assert b"_reconstructor" in pkl
    tree = safe_load(write_torch_zip(tmp_path / "p1.pt", pickle_bytes=pkl))
    assert isinstance(tree["cfg"], PickledObject) and tree["cfg"].state == {"marker": str(marker)}
    assert not marker.exists()
    # with a real (allow-listed) class as `cls`, _reconstructor would call into it: refused
    hostile = {"x": RawReduce(copyreg._reconstructor, collections.OrderedDict, object, None)}
    with pytest.raises(UnsafeCheckpointError, match="_reconstructor"):
        safe_load(write_torch_zip(tmp_path / "rc.pt", hostile))
    newobj_real_class = b"\x80\x02ccopyreg\n__newobj__\nccollections\nOrderedDict\n\x85R."
    with pytest.raises(UnsafeCheckpointError, match="__newobj__"):
        safe_load(write_torch_zip(tmp_path / "no.pt", pickle_bytes=newobj_real_class))
    newobj_placeholder = b"\x80\x02ccopyreg\n__newobj__\ncos\nstat_result\n\x85R."
    assert type(safe_load(write_torch_zip(tmp_path / "np.pt", pickle_bytes=newobj_placeholder))).pickle_ref == "os.stat_result"


def test_global_reference_without_call_is_inert(tmp_path):
    tree = safe_load(write_torch_zip(tmp_path / "ref.pt", {"model": {}, "fn": os.system, "cls": subprocess.Popen}))
    assert isinstance(tree["fn"], type) and tree["fn"].pickle_ref.endswith(".system")
    assert tree["cls"].pickle_ref == "subprocess.Popen"


def test_rebuild_from_type_with_foreign_function_is_refused(tmp_path):
    evil = RawReduce(torch._tensor._rebuild_from_type_v2, os.system, torch.Tensor, ("echo hi",), {})
    with pytest.raises(UnsafeCheckpointError, match="_rebuild_from_type_v2"):
        safe_load(write_torch_zip(tmp_path / "rft.pt", {"x": evil}))


def test_tensor_subclass_and_parameter_records_load(tmp_path):
    sd = {"p": torch.nn.Parameter(torch.randn(3, 2)), "buf": torch.arange(4)}
    torch.save({"model": sd}, tmp_path / "param.pt")
    loaded = load_pt_state_dict(tmp_path / "param.pt")
    assert type(loaded["p"]) is torch.Tensor and torch.equal(loaded["p"], sd["p"].detach())
    assert loaded["buf"].dtype == torch.int64 and torch.equal(loaded["buf"], sd["buf"])


def test_out_of_bounds_tensor_record_is_rejected(tmp_path):
    storage = FakeStorage("0", 4)
    obj = {"model": {"w": tensor_record(storage, offset=2, size=(2, 2), stride=(2, 1))}}
    path = write_torch_zip(tmp_path / "oob.pt", obj, records={"0": torch.zeros(4).numpy().tobytes()})
    with pytest.raises(CheckpointError, match="reaches past its storage"):
        load_pt_state_dict(path)


def test_record_one_element_past_its_storage_and_huge_stride_0_views_are_rejected(tmp_path):
    storage = FakeStorage("0", 4)
    data = {"0": torch.zeros(4).numpy().tobytes()}
    path = write_torch_zip(tmp_path / "past.pt", {"model": {"w": tensor_record(storage, size=(5,))}}, records=data)
    with pytest.raises(CheckpointError, match="reaches past its storage of 4 elements"):
        safe_load(path)
    write_torch_zip(path, {"model": {"w": tensor_record(storage, size=(4,))}}, records=data)
    assert tuple(safe_load(path)["model"]["w"].materialize().shape) == (4,)  # exactly the storage: fine
    huge = tensor_record(FakeStorage("0", 1), size=(2 ** 21, 2 ** 20), stride=(0, 0))  # 2**41 views of 1 float
    path = write_torch_zip(tmp_path / "huge.pt", {"model": {"w": huge}}, records={"0": torch.zeros(1).numpy().tobytes()})
    with pytest.raises(CheckpointError, match=r"\(2199023255552 elements\)"):
        safe_load(path)


def test_short_storage_record_is_reported_as_truncated(tmp_path):
    storage = FakeStorage("0", 4)
    obj = {"model": {"w": tensor_record(storage, size=(4,))}}
    path = write_torch_zip(tmp_path / "short.pt", obj, records={"0": torch.zeros(2).numpy().tobytes()})
    with pytest.raises(CheckpointError, match="re-download"):
        load_pt_state_dict(path)


# --- unreadable / wrong files --------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="not found"):
        load_pt_state_dict(tmp_path / "nope.pt")


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty \(0 bytes\).*re-download"):
        load_pt_state_dict(tmp_path / "empty.pt")


def test_truncated_file(tmp_path, official):
    path, _ = official
    data = path.read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated or corrupt.*re-download"):
        load_pt_state_dict(tmp_path / "half.pt")


def test_corrupt_storage_bytes_fail_the_crc(tmp_path):
    torch.save({"model": {"w": torch.arange(64, dtype=torch.float32)}}, tmp_path / "ok.pt")
    data = bytearray((tmp_path / "ok.pt").read_bytes())
    with zipfile.ZipFile(tmp_path / "ok.pt") as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # first byte of the record (local header read)
    data[start + 10] ^= 0xFF
    (tmp_path / "bad.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="re-download"):
        load_pt_state_dict(tmp_path / "bad.pt")



def _patch_central_directory(data: bytes, patch) -> bytes:
    """`patch(bytearray, offset)` applied to every central directory entry of a zip file."""
    data = bytearray(data)
    entry = data.find(b"PK\x01\x02")
    while entry != -1:
        patch(data, entry)
        entry = data.find(b"PK\x01\x02", entry + 4)
    return bytes(data)


def _set_flag_bits(bits):
    def patch(data, entry):
        data[entry + 8:entry + 10] = (int.from_bytes(data[entry + 8:entry + 10], "little") | bits).to_bytes(2, "little")
    return patch


def _bad_utf8_name(data, entry):  # flag bit 11 says UTF-8, but the name is not
    _set_flag_bits(0x800)(data, entry)
    data[entry + 46] = 0xFF


def _future_zip_version(data, entry):
    data[entry + 6:entry + 8] = (64).to_bytes(2, "little")  # "version needed to extract" 6.4


@pytest.mark.parametrize("patch", [_bad_utf8_name, _future_zip_version, _set_flag_bits(0x40), _set_flag_bits(0x20)],
                         ids=["non-utf8-name", "zip-version-6.4", "strong-encryption", "patched-data"])
def test_a_damaged_zip_directory_is_one_clear_error(tmp_path, patch):
    """Found by fuzzing the central directory: zipfile raised a bare UnicodeDecodeError or NotImplementedError."""
    torch.save({"model": {"w": torch.ones(4)}}, tmp_path / "ok.pt")
    (tmp_path / "bad.pt").write_bytes(_patch_central_directory((tmp_path / "ok.pt").read_bytes(), patch))
    with pytest.raises(CheckpointError, match=r"bad\.pt.*re-download"):
        load_pt_state_dict(tmp_path / "bad.pt")


def test_a_local_header_with_a_non_utf8_name_is_one_clear_error(tmp_path):
    """The local header (read when a record is opened) flags its name UTF-8 but it is not: was a bare
    UnicodeDecodeError from zipfile."""
    torch.save({"model": {"w": torch.ones(4)}}, tmp_path / "ok.pt")
    data = bytearray((tmp_path / "ok.pt").read_bytes())
    with zipfile.ZipFile(tmp_path / "ok.pt") as zf:
        offset = next(i for i in zf.infolist() if i.filename.endswith("data.pkl")).header_offset
    data[offset + 6:offset + 8] = (int.from_bytes(data[offset + 6:offset + 8], "little") | 0x800).to_bytes(2, "little")
    data[offset + 30] = 0xFF  # first byte of the name
    (tmp_path / "bad.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"bad\.pt: cannot read record .*data\.pkl.*re-download"):
        load_pt_state_dict(tmp_path / "bad.pt")

def test_not_a_zip(tmp_path):
    (tmp_path / "notes.pt").write_text("hello, this is text")
    with pytest.raises(CheckpointError, match="not a PyTorch .pt checkpoint"):
        load_pt_state_dict(tmp_path / "notes.pt")


def test_legacy_format_is_refused_with_a_fix(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy \(pre-1.6\).*torch>=1.6"):
        load_pt_state_dict(tmp_path / "legacy.pt")


def test_safetensors_file_given_as_pt(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "model.pt"))
    with pytest.raises(CheckpointError, match="is a .safetensors file"):
        load_pt_state_dict(tmp_path / "model.pt")


def test_zip_without_pickle(tmp_path):
    with zipfile.ZipFile(tmp_path / "other.pt", "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match="no data.pkl"):
        load_pt_state_dict(tmp_path / "other.pt")


def test_stable_diffusion_checkpoint_is_named(tmp_path):
    sd15 = {"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.ones(2),
                           "cond_stage_model.transformer.x": torch.ones(1)}, "global_step": 470000, "epoch": 5}
    torch.save(sd15, tmp_path / "v1-5-pruned.ckpt")
    with pytest.raises(CheckpointError, match="looks like a Stable Diffusion checkpoint"):
        load_pt_state_dict(tmp_path / "v1-5-pruned.ckpt")


def test_missing_key_lists_the_top_level_keys(tmp_path):
    torch.save({"weights": {"w": torch.ones(1)}, "step": 3}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"no 'model' entry; its top-level keys are: 'weights', 'step'"):
        load_pt_state_dict(tmp_path / "other.pt")


def test_bare_state_dict_files(tmp_path):
    sd = {"gpt_model.decoder.layer_norm.weight": torch.randn(4), "aligner.encoder_query": torch.randn(3, 4)}
    torch.save(sd, tmp_path / "bare.pt")
    for key in (None, "model"):  # key=None: the top level IS the state dict; "model": accepted as a bare dict
        loaded = load_pt_state_dict(tmp_path / "bare.pt", key=key)
        assert set(loaded) == set(sd) and all(torch.equal(loaded[k], v) for k, v in sd.items())
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_pt_state_dict(tmp_path / "list.pt", key=None)


class TaggedTensor(torch.Tensor):
    """A tensor subclass: torch pickles it through `_rebuild_from_type_v2`."""


def test_legacy_args_numpy_and_subclass_records_are_inert(tmp_path):
    import argparse

    import numpy as np

    tagged = torch.randn(3).as_subclass(TaggedTensor)
    tagged.note = "extra state"
    checkpoint = {
        "args": argparse.Namespace(arch="kosmosg_xl", lr=[0.001], device=torch.device("cpu")),
        "model": {"w": tagged, "v": torch.arange(3.0)},
        "extra_state": {"rng": np.random.RandomState(0).get_state(), "array": np.arange(4.0)},
    }
    torch.save(checkpoint, tmp_path / "legacy_args.pt")
    tree = safe_load(tmp_path / "legacy_args.pt")
    args = tree["args"]
    assert type(args).pickle_ref == "argparse.Namespace" and args.state["arch"] == "kosmosg_xl"
    assert args.state["device"] == torch.device("cpu")
    assert isinstance(tree["extra_state"]["array"], PickledObject)
    assert type(tree["extra_state"]["array"]).pickle_ref.endswith("multiarray._reconstruct")
    loaded = load_pt_state_dict(tmp_path / "legacy_args.pt")
    assert type(loaded["w"]) is torch.Tensor and torch.equal(loaded["w"], tagged.as_subclass(torch.Tensor))
    assert torch.equal(loaded["v"], checkpoint["model"]["v"])


def test_untyped_storage_records_with_explicit_dtype(tmp_path):
    # _rebuild_tensor_v3: a byte storage read as float16
    values = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float16)
    storage = FakeStorage("0", values.numel() * 2, storage_type=torch.UntypedStorage)
    record = RawReduce(torch._utils._rebuild_tensor_v3, storage, 0, (3,), (1,), False, collections.OrderedDict(),
                       torch.float16)
    path = write_torch_zip(tmp_path / "v3.pt", {"model": {"h": record}}, records={"0": values.numpy().tobytes()})
    loaded = load_pt_state_dict(path)
    assert loaded["h"].dtype == torch.float16 and torch.equal(loaded["h"], values)


# --- hostile shapes (no calls, but crash / memory / time / cross-load effects) --------------------
def _proto2(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


@pytest.mark.parametrize("label, pickle_bytes, message", [
    # a dict key nested 100k deep: hashing it recursed in C until the process died (segfault)
    ("deep", _proto2(b"}N" + b"\x85" * 100_000 + b"Ns"), "nests containers more than 200 deep"),
    # memo slot 10^8 after two operations: the C unpickler grew its memo to 800 MB for a 20-byte pickle
    ("memo", _proto2(b"Nr" + struct.pack("<I", 100_000_000)), "memo entry 100000000"),
    # a frame longer than the pickle
    ("frame", b"\x80\x04\x95" + struct.pack("<Q", 2 ** 64 - 1) + b"N.", "frame"),
    # a 1000-bit integer (sizes / strides of that size made the bounds check take seconds)
    ("bigint", _proto2(b"\x8b" + struct.pack("<i", 126) + (2 ** 1000).to_bytes(126, "little")), "1001-bit integer"),
    # dict keys that all hash alike (k * (2**61 - 1)): building the dict is quadratic (40k keys took 9 s)
    ("collisions", _proto2(b"}(" + b"".join(b"\x8a\x0a" + (k * (2 ** 61 - 1)).to_bytes(10, "little", signed=True)
                                              + b"N" for k in range(1, 100)) + b"u"), "-bit integer"),
    # bytearray(10^9): a gigabyte from a few bytes
    ("bytearray", _proto2(b"c__builtin__\nbytearray\nJ\x00\xca\x9a;\x85R"), "bytearray"),
    # X -> (X, (None,)) by MARK NONE TUPLE TUPLE2: the check's stack model kept the mark under a TUPLE, so TUPLE2 lost
    # the depth below it; 200k deep, the dict key's hash crashed the process (a review: an 800 KB file, exit 139)
    ("marked-deep", _proto2(b"})" + b"(Nt\x86" * 10_000 + b"Ns"), "nests containers more than 200 deep"),
    # tuples of -1 / -2 (hash(-1) == hash(-2)) as dict keys all hash alike: 2 MB took a minute to build
    ("tuple-keys", _proto2(b"}(" + b"".join(b"".join(b"J" + struct.pack("<i", -1 - (k >> bit & 1)) for bit in range(3))
                                            + b"\x87N" for k in range(1001)) + b"u"),
     "more than 100 tuples or other containers as dict keys"),
    # the same keys through the DICT opcode, OrderedDict(pairs), set(list), frozenset(list): counted as they are built
    ("dict-opcode", _proto2(b"(" + b"".join(b"J" + struct.pack("<i", -1 - (k & 1)) + b"J" + struct.pack("<i", -1 - (k >> 1 & 1))
                                           + b"\x86N" for k in range(101)) + b"d"),
     "more than 100 tuples or other containers as dict keys"),
    ("ordereddict-pairs", _proto2(b"ccollections\nOrderedDict\n(" + b"".join(
        b"J" + struct.pack("<i", -1 - (k & 1)) + b"J" + struct.pack("<i", -1 - (k >> 1 & 1)) + b"\x86N\x86"
        for k in range(101)) + b"l\x85R"), "more than 100 tuples or other containers as dict keys"),
    ("set-list", _proto2(b"c__builtin__\nset\n(" + b"".join(
        b"J" + struct.pack("<i", -1 - (k & 1)) + b"J" + struct.pack("<i", -1 - (k >> 1 & 1)) + b"\x86" for k in range(101))
        + b"l\x85R"), "more than 100 tuples or other containers as dict keys"),
    ("frozenset-list", _proto2(b"c__builtin__\nfrozenset\n(" + b"".join(
        b"J" + struct.pack("<i", -1 - (k & 1)) + b"J" + struct.pack("<i", -1 - (k >> 1 & 1)) + b"\x86" for k in range(101))
        + b"l\x85R"), "more than 100 tuples or other containers as dict keys"),
])
def test_hostile_pickle_shapes_are_refused(tmp_path, label, pickle_bytes, message):
    path = write_torch_zip(tmp_path / f"{label}.pt", pickle_bytes=pickle_bytes)
    with pytest.raises(CheckpointError, match=message) as refused:
        safe_load(path)
    assert str(refused.value).startswith(str(path)), refused.value  # the file is named


def test_compressed_records_are_refused(tmp_path):
    # torch.save writes stored records; a deflated one could be a zip bomb (300 MB from 300 KB)
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"model": {}}, protocol=2))
    with pytest.raises(CheckpointError, match="compressed or encrypted"):
        safe_load(path)


def test_a_file_cannot_change_what_later_loads_read(tmp_path, official):
    # BUILD on the shared numpy constructor (and on a placeholder class) tried to rewrite them for every later load
    evil = _proto2(b"cnumpy._core.multiarray\nscalar\n}U\x03clsccollections\nOrderedDict\nsb0}U\x05model}s")
    path = write_torch_zip(tmp_path / "evil.pt", pickle_bytes=evil)
    with pytest.raises(CheckpointError, match="tries to modify numpy._core.multiarray.scalar"):
        safe_load(path)
    best = safe_load(official[0])["extra_state"]["best"]
    assert isinstance(best, PickledObject) and best.pickle_ref.endswith("multiarray.scalar")


def test_an_allowed_function_cannot_be_changed_by_a_file(tmp_path, official):
    """Found by a review: BUILD on GLOBAL torch._utils._rebuild_tensor_v2 (our own function) set its __defaults__
    for every later load in the process: good files then failed to load."""
    evil = _proto2(b"ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__)s\x86b0}")
    path = write_torch_zip(tmp_path / "poison.pt", pickle_bytes=evil)
    with pytest.raises(CheckpointError, match=rf"{path}: The pickle tries to modify _rebuild_tensor_v2"):
        safe_load(path)
    assert load_pt_state_dict(official[0])  # a good file still loads


def test_views_of_one_storage_in_several_dtypes_load(tmp_path):
    """Found by a review: torch.save writes uint16 / uint32 / float8 tensors over byte storages, so one storage can
    be viewed as two dtypes in a good file (refused for a while, to bound memory)."""
    values = torch.arange(6, dtype=torch.int32).to(torch.uint16)
    path = tmp_path / "views.pt"
    torch.save({"model": {"u16": values, "u32": values.view(torch.uint32), "bytes": values.view(torch.uint8)}}, path)
    loaded = load_pt_state_dict(path)
    reference = torch.load(path, weights_only=True)["model"]
    for name, tensor in reference.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert loaded["u16"].data_ptr() == loaded["u32"].data_ptr() == loaded["bytes"].data_ptr()


def _overlapping_zip(path: Path, pickle_bytes: bytes, names: list[str], payload: int) -> Path:
    """A zip whose records archive/data/<name> all end at the end of one shared payload: local headers back to back,
    then the payload (each record smaller than the file, but together many times it)."""
    def local(name, size, crc=0):
        return struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, crc, size, size, len(name), 0) + name

    def central(name, size, offset, crc=0):
        return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, crc, size, size, len(name), 0, 0, 0,
                           0, 0, offset) + name

    body, directory = bytearray(), bytearray()
    for name, data in ((b"archive/data.pkl", pickle_bytes), (b"archive/byteorder", b"little")):
        directory += central(name, len(data), len(body), zlib.crc32(data))
        body += local(name, len(data), zlib.crc32(data)) + data
    encoded = [f"archive/data/{name}".encode() for name in names]
    offsets = [len(body) + sum(30 + len(n) for n in encoded[:i]) for i in range(len(encoded))]
    end = len(body) + sum(30 + len(n) for n in encoded) + payload + 1
    for name, offset in zip(encoded, offsets):
        size = end - (offset + 30 + len(name))
        body += local(name, size)
        directory += central(name, size, offset)
    body += bytes(payload + 1)
    count = 2 + len(names)
    path.write_bytes(bytes(body + directory + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(directory),
                                                          len(body), 0)))
    return path


def test_records_read_more_than_the_file_holds_are_refused(tmp_path):
    """Found by a review: memory many times the file's size, before any check. (a) One record viewed as two dtypes
    was read again for every tensor; (b) zip records whose data overlap each read the same bytes (200 records of
    one 10 MB payload: 2 GB)."""
    values = torch.arange(8, dtype=torch.float32)
    raw = FakeStorage("0", values.numel() * 4, storage_type=torch.UntypedStorage)
    as_bytes = RawReduce(torch._utils._rebuild_tensor_v3, raw, 0, (32,), (1,), False, collections.OrderedDict(),
                         torch.uint8)
    as_floats = RawReduce(torch._utils._rebuild_tensor_v3, raw, 0, (8,), (1,), False, collections.OrderedDict(),
                          torch.float32)
    path = write_torch_zip(tmp_path / "alias.pt", {"model": {**{f"a{k}": as_bytes for k in range(50)},
                                                              **{f"b{k}": as_floats for k in range(50)}}},
                           records={"0": values.numpy().tobytes()})
    loaded = load_pt_state_dict(path)  # read once, and the views share its bytes (they were read once per tensor)
    assert torch.equal(loaded["b7"], values) and loaded["a0"].data_ptr() == loaded["b49"].data_ptr()
    buffer = io.BytesIO()
    _StoragePickler(buffer, protocol=2).dump(
        {"model": {str(k): tensor_record(FakeStorage(str(k), 5000), size=(5000,)) for k in range(3)}})
    # each read stops short of its record's end, where zipfile would check the CRC
    path = _overlapping_zip(tmp_path / "overlap.pt", buffer.getvalue(), ["0", "1", "2"], payload=20_000)
    assert path.stat().st_size < 2 * 20_000
    with pytest.raises(CheckpointError, match=r"overlap\.pt: its records hold more bytes than the file"):
        load_pt_state_dict(path)


def test_malformed_files_are_named_and_typed(tmp_path):
    """Found by a review: errors raised while unpickling named no file; shapes no model has (a 0-channel conv) ended
    in a ZeroDivisionError traceback; a config JSON nested deep in a RecursionError."""
    from safetensors.torch import save_file

    from kosmosg_core.checkpoint import read_checkpoint, to_official_state_dict
    from kosmosg_core.model import KosmosG

    storage = FakeStorage("0", 4)
    path = write_torch_zip(tmp_path / "offset.pt", {"model": {"w": tensor_record(storage, offset=-1)}},
                           records={"0": bytes(16)})
    with pytest.raises(CheckpointError, match=rf"^{path}: Malformed tensor record: storage offset -1"):
        safe_load(path)
    state = KosmosG(KosmosGConfig.tiny()).state_dict()
    state["vision.conv1.weight"] = torch.zeros(0, *state["vision.conv1.weight"].shape[1:])  # 0 output channels
    zero = tmp_path / "zero.pt"
    torch.save({"model": to_official_state_dict(state)}, zero)
    with pytest.raises(CheckpointError, match=rf"{zero}: Cannot derive a Kosmos-G config from the checkpoint's shapes"):
        read_checkpoint(zero, read_tensors=False)
    deep = tmp_path / "deep.safetensors"
    save_file({"w": torch.zeros(1)}, str(deep), metadata={"format": "kosmosg", "format_version": "1",
                                                          "config": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(CheckpointError, match="nests too deep"):
        read_checkpoint(deep, read_tensors=False)


def test_big_endian_complex_swaps_each_part(tmp_path):
    storage = FakeStorage("0", 1, torch.ComplexFloatStorage)
    path = write_torch_zip(tmp_path / "c.pt", {"model": {"z": tensor_record(storage, size=(1,))}},
                           records={"0": struct.pack(">ff", 1.0, 2.0)}, byteorder="big")
    assert load_pt_state_dict(path)["z"].tolist() == [complex(1.0, 2.0)]


# The reviewed allow-list: a change here is a security change (review it, then update this set).
REVIEWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_from_type_v2"), ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Size"), ("torch", "device"), ("collections", "OrderedDict"), ("collections", "defaultdict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"), ("builtins", "bytearray"),
    ("builtins", "slice"), ("copyreg", "_reconstructor"), ("copyreg", "__newobj__"), ("copyreg", "__newobj_ex__"),
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy._core.multiarray", "_reconstruct"), ("numpy", "dtype"),
}


def test_the_allow_list_is_the_reviewed_one():
    from kosmosg_core.safe_unpickle import _SAFE_GLOBALS

    assert set(_SAFE_GLOBALS) == REVIEWED_GLOBALS


def _call_pickle(module: str, name: str, *args: str) -> bytes:
    """Protocol-2 pickle bytes of {"model": {}, "x": module.name(*args)} (GLOBAL + REDUCE), written by hand."""
    def text(value: str) -> bytes:
        data = value.encode()
        return b"X" + struct.pack("<I", len(data)) + data

    call = f"c{module}\n{name}\n".encode() + b"(" + b"".join(map(text, args)) + b"tR"
    return b"\x80\x02}(" + text("model") + b"}" + text("x") + call + b"u."


@pytest.mark.parametrize("module, name, args", [
    ("builtins", "getattr", ("abc", "upper")),  # getattr + a call: the first step to any object
    ("torch", "save", ("owned", "MARKER")),  # every torch.* function is reachable by name "torch"
    ("torch.serialization", "save", ("owned", "MARKER")),
    ("torch", "load", ("MARKER",)),
    ("torch", "tensor", ("x",)),
])
def test_calls_outside_the_allow_list_are_refused(tmp_path, module, name, args):
    marker = tmp_path / "marker"
    pkl = _call_pickle(module, name, *[str(marker) if a == "MARKER" else a for a in args])
    with pytest.raises(UnsafeCheckpointError, match=rf"{module}\.{name}"):
        safe_load(write_torch_zip(tmp_path / "call.pt", pickle_bytes=pkl))
    assert not marker.exists()



@pytest.mark.parametrize("name, obj, pickle_bytes, refused", [
    # a placeholder instance called (REDUCE on it): nothing it stands for may run
    ("instance", None, b"\x80\x02ccopyreg\n__newobj__\ncos\nstat_result\n\x85R)R.", "os.stat_result(instance)"),
    # defaultdict is allowed only as omegaconf pickles it, empty (items would come from a call)
    ("defaultdict", {"x": RawReduce(collections.defaultdict, dict, {"a": 1})}, None,
     "collections.defaultdict(with items)"),
    # _codecs.encode only as protocol 2 writes bytes: str -> latin1 / utf-8, strict
    ("codec", {"x": RawReduce(__import__("codecs").encode, "abc", "rot13")}, None, "_codecs.encode"),
    ("codec-errors", {"x": RawReduce(__import__("codecs").encode, "abc", "latin1", "ignore")}, None, "_codecs.encode"),
])
def test_allowed_helpers_refuse_what_they_do_not_need(tmp_path, name, obj, pickle_bytes, refused):
    """Found by a mutation review: each of these refusals could be removed with every test still passing."""
    path = write_torch_zip(tmp_path / f"{name}.pt", obj, pickle_bytes=pickle_bytes)
    with pytest.raises(UnsafeCheckpointError, match=re.escape(f"calls `{refused}`")):
        safe_load(path)


def test_one_storage_named_with_two_dtypes_is_refused(tmp_path):
    """Found by a mutation review: untested. A record that names one storage as float32 and as float16 is not
    something torch.save writes (it writes untyped storages viewed per tensor); refused, not read both ways."""
    storage_f32, storage_f16 = FakeStorage("0", 2, torch.FloatStorage), FakeStorage("0", 4, torch.HalfStorage)
    obj = {"a": tensor_record(storage_f32), "b": tensor_record(storage_f16, size=(4,))}
    path = write_torch_zip(tmp_path / "two.pt", obj, records={"0": b"\0" * 8})
    with pytest.raises(CheckpointError, match="Storage '0' is named with two dtypes"):
        safe_load(path)["b"]
