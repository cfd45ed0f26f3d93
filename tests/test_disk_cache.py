"""DiskCache (encodings kept across restarts) and the pipeline's use of it."""

import logging
import os
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from kosmosg_core.disk_cache import CACHE_FORMAT, DiskCache, checkpoint_identity
from kosmosg_core.errors import CheckpointError, CheckpointNotFoundError
from kosmosg_core.pipeline import KosmosGPipeline, UnreadWeights
from support.tiny_kosmosg import write_tiny_pack


def image(seed, size=(40, 30)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


def set_mtime(cache, key, seconds):
    path = cache._path(key)
    os.utime(path, ns=(seconds * 10**9, seconds * 10**9))


# --- DiskCache ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_put_get_round_trip_is_exact(tmp_path, dtype):
    cache = DiskCache(tmp_path / "cache")
    value = torch.randn(2, 77, 16).to(dtype)
    key = cache.key("encoding", "model", [1, 2, 3])
    assert cache.get(key) is None
    cache.put(key, value)
    again = DiskCache(tmp_path / "cache").get(key)  # another instance: what a restarted process sees
    assert again.dtype == dtype and torch.equal(again, value)
    assert cache.size_bytes() > value.numel() * value.element_size()


def test_keys_differ_in_every_part():
    keys = {DiskCache.key("encoding", "model", [1, 2]), DiskCache.key("vision", "model", [1, 2]),
            DiskCache.key("encoding", "other", [1, 2]), DiskCache.key("encoding", "model", [1, 3]),
            DiskCache.key("encoding", "model", [1, 2], [0.5])}
    assert len(keys) == 5


def test_the_format_is_part_of_the_key(monkeypatch):
    from kosmosg_core import disk_cache

    before = DiskCache.key("encoding", "model")
    monkeypatch.setattr(disk_cache, "CACHE_FORMAT", CACHE_FORMAT + 1)
    assert DiskCache.key("encoding", "model") != before


def test_damaged_entry_is_a_miss_and_removed(tmp_path, caplog):
    cache = DiskCache(tmp_path)
    key = cache.key("x")
    cache.put(key, torch.ones(100))
    path = cache._path(key)
    path.write_bytes(path.read_bytes()[:-50])  # truncated
    with caplog.at_level(logging.WARNING):
        assert cache.get(key) is None
    assert "damaged entry" in caplog.text and not path.exists()


def test_least_recently_used_entries_go_first(tmp_path):
    value = torch.zeros(1000)  # 4000 bytes + header
    cache = DiskCache(tmp_path, max_bytes=10**9)
    keys = [cache.key(k) for k in range(3)]
    for seconds, key in enumerate(keys):
        cache.put(key, value)
        set_mtime(cache, key, 1_000_000 + seconds)
    entry = cache._path(keys[0]).stat().st_size
    assert cache.get(keys[0]) is not None  # used now: the newest
    cache.max_bytes = 3 * entry
    cache.put(cache.key(3), value)  # 4 entries > 3: the least recently used (keys[1]) goes
    assert cache.get(keys[1]) is None
    assert all(cache.get(key) is not None for key in (keys[0], keys[2], cache.key(3)))
    assert cache.size_bytes() <= cache.max_bytes


def test_unwritable_folder_warns_once_per_cause_and_raises_nothing(tmp_path, caplog, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = DiskCache(blocker / "cache")
    with caplog.at_level(logging.WARNING):
        cache.put(cache.key(1), torch.ones(3))
        cache.put(cache.key(2), torch.ones(3))
    assert caplog.text.count("cannot write") == 1
    assert cache.get(cache.key(1)) is None and cache.entries() == []
    from kosmosg_core import files

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "save_safetensors", disk_full)
    cache.directory = tmp_path / "cache"  # a folder that can be made: the write itself fails now
    with caplog.at_level(logging.WARNING):
        cache.put(cache.key(3), torch.ones(3))  # another cause: said too
        cache.put(cache.key(4), torch.ones(3))
    assert caplog.text.count("cannot write") == 2 and "No space left" in caplog.text


def test_the_folder_is_private_and_shared_entries_are_used_not_destroyed(tmp_path, monkeypatch):
    """Entries hold encodings of the user's prompts and images: the folder it makes is 0700. In a folder shared
    with other users, an entry whose time cannot be set is still served, one that cannot be read or removed is a
    miss: never an exception, never a good entry deleted."""
    from pathlib import Path

    from kosmosg_core import disk_cache

    cache = DiskCache(tmp_path / "cache")
    key = cache.key("x")
    cache.put(key, torch.ones(3))
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(disk_cache.os, "utime", deny)
    assert torch.equal(cache.get(key), torch.ones(3))
    monkeypatch.setattr(Path, "unlink", deny)
    cache._path(key).write_bytes(b"damaged")
    assert cache.get(key) is None  # damaged, and removing it was refused: a miss
    cache.max_bytes = 1
    cache.put(cache.key("y"), torch.ones(3))  # eviction refused too: no exception
    monkeypatch.undo()
    cache.max_bytes = 10**9
    cache.put(key, torch.ones(3))
    from kosmosg_core import files
    monkeypatch.setattr(files, "read_safetensors", deny)
    assert cache.get(key) is None and cache._path(key).exists()  # unreadable (another user's): kept


def test_zero_bytes_keeps_nothing_and_bad_sizes_are_refused(tmp_path):
    cache = DiskCache(tmp_path / "c", max_bytes=0)
    cache.put(cache.key(1), torch.ones(3))
    assert cache.get(cache.key(1)) is None and not (tmp_path / "c").exists()
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="max_bytes"):
            DiskCache(tmp_path, max_bytes=bad)


def test_a_full_disk_is_one_warning_and_an_unreadable_subfolder_does_not_stop_eviction(tmp_path, caplog,
                                                                                          monkeypatch):
    from kosmosg_core import files

    cache = DiskCache(tmp_path / "cache", max_bytes=10**9)

    def disk_full(tensors, path, metadata=None):
        raise OSError(28, f"No space left on device (writing {path})")  # each entry's message names its file

    with monkeypatch.context() as patch:
        patch.setattr(files, "save_safetensors", disk_full)
        with caplog.at_level(logging.WARNING):
            for k in range(3):
                cache.put(cache.key(k), torch.ones(3))
    assert caplog.text.count("cannot write") == 1
    for k in range(4):
        cache.put(cache.key(k), torch.zeros(1000))
    entry = cache.entries()[0][1]
    unreadable = cache._path(cache.key(0)).parent
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: (_ for _ in ()).throw(PermissionError(13, "denied"))
                        if str(path) == str(unreadable) else real_scandir(path))
    cache.max_bytes = 2 * entry
    cache._size = None
    cache.put(cache.key(9), torch.zeros(1000))  # evicts among the readable entries, no exception
    assert cache.size_bytes() <= 2 * entry


def test_parse_size_gib():
    from kosmosg_core.disk_cache import parse_size_gib

    assert parse_size_gib("1") == 2**30 and parse_size_gib("0") == 0 and parse_size_gib(" 0.5") == 2**29
    for bad in ("-1", "nan", "inf", "lots", ""):
        with pytest.raises(ValueError, match="not a number of GiB >= 0"):
            parse_size_gib(bad)


def test_clear_and_eviction_touch_only_entries(tmp_path):
    """A cache folder may be one that holds other files (a --cache-dir given by hand): clearing and eviction
    remove only files named as entries are, in the folder their name says."""
    cache = DiskCache(tmp_path)
    for k in range(3):
        cache.put(cache.key(k), torch.ones(2))
    keep = [tmp_path / "sd" / "model.safetensors", tmp_path / "ab" / ("ab" + "0" * 62 + ".txt"),
            tmp_path / "cd" / ("ab" + "0" * 62 + ".safetensors"), tmp_path / "notes.safetensors"]
    for path in keep:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 10_000)
    assert len(cache.entries()) == 3
    cache.max_bytes = 1
    cache.put(cache.key(3), torch.ones(2))  # evicts all entries
    cache.clear()
    assert cache.entries() == [] and cache.get(cache.key(0)) is None
    assert all(path.is_file() for path in keep)
    elsewhere = tmp_path.parent / (tmp_path.name + "-elsewhere")  # a link to another folder, named as a subfolder
    elsewhere.mkdir()
    victim = elsewhere / ("ef" + "1" * 62 + ".safetensors")
    victim.write_bytes(b"x")
    (tmp_path / "ef").symlink_to(elsewhere, target_is_directory=True)
    (tmp_path / "ab" / ("ab" + "2" * 62 + ".safetensors")).symlink_to(victim)
    assert cache.entries() == []
    cache.clear()
    assert victim.is_file()


def test_checkpoint_identity_changes_when_the_file_is_replaced(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"a" * 10)
    first = checkpoint_identity(path)
    assert checkpoint_identity(path) == first
    os.utime(path, ns=(1, 1))
    assert checkpoint_identity(path) != first


def test_checkpoint_identity_tells_a_file_copied_in_with_the_old_size_and_time(tmp_path):
    """Found by a review: `cp -p` / `rsync -a` of another checkpoint of the same size over the old one kept size and
    modification time, so the cache served the old model's encodings."""
    path, other = tmp_path / "model.safetensors", tmp_path / "retrained.safetensors"
    path.write_bytes(b"a" * 10)
    other.write_bytes(b"b" * 10)
    stat = path.stat()
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    before = checkpoint_identity(path)
    time.sleep(0.01)  # coarse file-system clocks: the copy's status change is a later tick
    shutil.copy2(other, tmp_path / "incoming")
    os.replace(tmp_path / "incoming", path)  # what rsync -a leaves: the same size and modification time
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert checkpoint_identity(path) != before
    before = checkpoint_identity(path)
    time.sleep(0.01)
    other.write_bytes(b"c" * 10)
    shutil.copyfile(other, path)  # what cp -p over the file does: rewritten in place, then its times set back
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert checkpoint_identity(path) != before


# --- the pipeline with a disk cache ---------------------------------------------------------------
class ModelRuns(AssertionError):
    pass


def forbid_model(pipe, monkeypatch, vision=True, decoder=True):
    """Make the vision tower and / or the MLLM + aligner raise if run."""
    def refuse(*args, **kwargs):
        raise ModelRuns("the model ran")

    if vision:
        monkeypatch.setattr(pipe.model, "encode_images", refuse)
    if decoder:
        monkeypatch.setattr(pipe.model, "forward", refuse)


@pytest.fixture
def checkpoint(pack, tmp_path):
    path = tmp_path / "model.safetensors"
    shutil.copy(pack[0], path)
    return path


PROMPT = "a photo of <i> wearing <i> on the beach"


def test_a_restarted_pipeline_reads_encodings_back_without_the_model(checkpoint, tmp_path, monkeypatch):
    cache = DiskCache(tmp_path / "cache")
    first = KosmosGPipeline.from_checkpoint(checkpoint)
    computes = []
    cond = first.encode(PROMPT, [image(0), image(1)], image_weights=[1.0, 0.5], disk_cache=cache,
                        before_compute=lambda: computes.append(1))
    uncond = first.encode_unconditional("blurry", disk_cache=cache, before_compute=lambda: computes.append(1))
    assert computes == [1, 1]  # once per call, before the model ran

    restarted = KosmosGPipeline.from_checkpoint(checkpoint)
    forbid_model(restarted, monkeypatch)
    progress = []
    again = restarted.encode(PROMPT, [image(0), image(1)], image_weights=[1.0, 0.5], disk_cache=cache,
                             before_compute=lambda: computes.append(1), progress=lambda: progress.append(1))
    assert torch.equal(again, cond) and len(progress) == 3  # two images and the prompt: the bar completes
    assert torch.equal(restarted.encode_unconditional("blurry", disk_cache=cache, batch_size=2),
                       uncond.expand(2, -1, -1))
    assert computes == [1, 1]  # nothing computed, so the model was never asked for (ComfyUI: no GPU load)


def test_cached_image_features_serve_a_new_prompt(checkpoint, tmp_path, monkeypatch):
    cache = DiskCache(tmp_path / "cache")
    KosmosGPipeline.from_checkpoint(checkpoint).encode(PROMPT, [image(0), image(1)], disk_cache=cache)
    expected = KosmosGPipeline.from_checkpoint(checkpoint).encode("<i> and <i> in the snow", [image(1), image(0)])

    restarted = KosmosGPipeline.from_checkpoint(checkpoint)
    forbid_model(restarted, monkeypatch, decoder=False)  # the vision tower must not run; the new text must
    got = restarted.encode("<i> and <i> in the snow", [image(1), image(0)], disk_cache=cache)
    assert torch.equal(got, expected)


def test_other_inputs_are_not_served_from_the_cache(checkpoint, tmp_path):
    cache = DiskCache(tmp_path / "cache")
    pipe = KosmosGPipeline.from_checkpoint(checkpoint)
    pipe.encode(PROMPT, [image(0), image(1)], disk_cache=cache)
    pipe.encode_unconditional("", disk_cache=cache)
    plain = KosmosGPipeline.from_checkpoint(checkpoint)
    for args, kwargs in [((PROMPT, [image(0), image(1)]), {"image_weights": [1.0, 0.5]}),
                         ((PROMPT, [image(0), image(2)]), {}),
                         ((PROMPT, [image(1), image(0)]), {}),  # the same images the other way round
                         (("a photo of <i> wearing <i> on the moon", [image(0), image(1)]), {})]:
        fresh = KosmosGPipeline.from_checkpoint(checkpoint)
        assert torch.equal(fresh.encode(*args, disk_cache=cache, **kwargs), plain.encode(*args, **kwargs))
    fresh = KosmosGPipeline.from_checkpoint(checkpoint)
    assert torch.equal(fresh.encode_unconditional("ugly", disk_cache=cache), plain.encode_unconditional("ugly"))
    # two negatives of as many tokens: keyed by their ids, not their length (found by a mutation review)
    candidates = ["a dog", "a cat", "a god", "a tac", "dark", "drak", "x", "y"]
    first, second = next((a, b) for a in candidates for b in candidates
                         if a < b and len(plain.tokenizer.encode(a)) == len(plain.tokenizer.encode(b)))
    KosmosGPipeline.from_checkpoint(checkpoint).encode_unconditional(first, disk_cache=cache)
    fresh = KosmosGPipeline.from_checkpoint(checkpoint)
    assert torch.equal(fresh.encode_unconditional(second, disk_cache=cache), plain.encode_unconditional(second))
    assert not torch.equal(plain.encode_unconditional(second), plain.encode_unconditional(first))


def test_a_replaced_checkpoint_is_another_model(checkpoint, tmp_path, monkeypatch):
    cache = DiskCache(tmp_path / "cache")
    KosmosGPipeline.from_checkpoint(checkpoint).encode(PROMPT, [image(0), image(1)], disk_cache=cache)
    os.utime(checkpoint, ns=(10**9, 10**9))  # e.g. retrained and written again
    replaced = KosmosGPipeline.from_checkpoint(checkpoint)
    forbid_model(replaced, monkeypatch)
    with pytest.raises(ModelRuns):
        replaced.encode(PROMPT, [image(0), image(1)], disk_cache=cache)
    other_dtype = KosmosGPipeline.from_checkpoint(checkpoint, dtype="bfloat16")
    assert other_dtype.model_key() != replaced.model_key()


def test_the_model_is_asked_for_before_it_runs(checkpoint, tmp_path, monkeypatch):
    """before_compute (ComfyUI: load the model onto the GPU) comes before the vision tower and the decoder run, so
    nothing is computed where it should not be, nor stored under the wrong device."""
    events = []
    pipe = KosmosGPipeline.from_checkpoint(checkpoint)
    for part in ("encode_images", "forward"):
        real = getattr(pipe.model, part)
        monkeypatch.setattr(pipe.model, part, lambda *a, real=real, part=part, **k: events.append(part) or real(*a, **k))
    cache = DiskCache(tmp_path / "cache")
    pipe.encode(PROMPT, [image(0), image(1)], disk_cache=cache, before_compute=lambda: events.append("load"))
    assert events == ["load", "encode_images", "forward"]
    events.clear()
    pipe.clear_cache()  # features on disk, the new text not: the decoder runs after the load
    pipe.encode("<i> then <i>", [image(0), image(1)], disk_cache=cache, before_compute=lambda: events.append("load"))
    assert events == ["load", "forward"]
    events.clear()
    pipe.encode_unconditional("dull", disk_cache=cache, before_compute=lambda: events.append("load"))
    assert events == ["load", "forward"]


def test_chunks_read_before_the_model_moved_join_the_ones_computed_after(checkpoint, tmp_path, monkeypatch):
    """ComfyUI: the model sits on the CPU until before_compute moves it to the GPU. A batch whose first chunk of
    prompts comes from the disk cache (read while the model was on the CPU) and whose next chunk is computed
    (on the GPU) ends on the model's device ('meta' stands in for the GPU here)."""
    from kosmosg_core.pipeline import PROMPT_CHUNK

    cache = DiskCache(tmp_path / "cache")
    prompts = [f"a dog number {k}" for k in range(PROMPT_CHUNK)]
    KosmosGPipeline.from_checkpoint(checkpoint).encode(prompts, disk_cache=cache)
    pipe = KosmosGPipeline.from_checkpoint(checkpoint, pack_cpu_linears=False)
    pipe.compute_device = torch.device("cpu")  # what the keys say (the entries were made on the CPU)
    moved = []
    monkeypatch.setattr(KosmosGPipeline, "device", property(lambda self: torch.device("meta" if moved else "cpu")))
    monkeypatch.setattr(pipe, "encode_ids", lambda ids, embeds: torch.zeros(len(ids), 77, 768, device="meta"))
    monkeypatch.setattr(cache, "put", lambda key, value: None)  # a meta tensor has no data to store
    out = pipe.encode(prompts + ["a cat"], disk_cache=cache, before_compute=lambda: moved.append(1))
    assert moved == [1] and out.device.type == "meta" and out.shape == (PROMPT_CHUNK + 1, 77, 768)


def test_how_the_model_computes_is_part_of_the_key(checkpoint, tmp_path, monkeypatch):
    """Values computed another way differ in the last bits: packed CPU linears (another kernel), another device,
    another dtype do not share entries. A model moved to another device is keyed there (the in-memory caches
    too), unless compute_device pins where it computes."""
    cache = DiskCache(tmp_path / "cache")
    KosmosGPipeline.from_checkpoint(checkpoint, pack_cpu_linears=False).encode(PROMPT, [image(0), image(1)],
                                                                                disk_cache=cache)
    packed = KosmosGPipeline.from_checkpoint(checkpoint, pack_cpu_linears=True, cpu_kernel="onednn")
    forbid_model(packed, monkeypatch)
    with pytest.raises(ModelRuns):
        packed.encode(PROMPT, [image(0), image(1)], disk_cache=cache)
    plain = KosmosGPipeline.from_checkpoint(checkpoint, pack_cpu_linears=False)
    key = plain.model_key()
    assert "torch " + torch.__version__ in key and key != packed.model_key()
    plain.model.to("meta")
    assert plain.model_key() != key  # moved: computed elsewhere from now on
    plain.compute_device = torch.device("cpu")
    assert plain.model_key() == key
    plain.model.cfg.decoder.heads //= 2  # e.g. an official file's sidecar head count changed: another model
    assert plain.model_key() != key


# --- a lazy pipeline (weights read on first use) -----------------------------------------------------
@pytest.mark.parametrize("dtype, pack_cpu_linears, cpu_kernel", [
    ("float32", None, "auto"), ("float32", True, "onednn"), ("float32", False, "auto"), ("bfloat16", None, "auto"),
    ("float16", None, "auto")])
def test_a_lazy_pipeline_is_keyed_and_encodes_as_the_loaded_one(checkpoint, dtype, pack_cpu_linears, cpu_kernel):
    """Its keys are known before its weights are read (the packed kernels included), so the disk cache serves it."""
    options = {"dtype": dtype, "pack_cpu_linears": pack_cpu_linears, "cpu_kernel": cpu_kernel}
    lazy = KosmosGPipeline.from_checkpoint(checkpoint, lazy=True, **options)
    loaded = KosmosGPipeline.from_checkpoint(checkpoint, **options)
    assert not lazy.is_loaded and loaded.is_loaded
    assert lazy.model_key() == loaded.model_key()
    for name in ("cfg", "dtype", "device", "context_dim"):
        assert getattr(lazy, name) == getattr(loaded, name), name
    if dtype == "float16":
        return  # the CPU has no float16 matmuls for the model to run
    got = lazy.encode(PROMPT, [image(0), image(1)])
    assert lazy.is_loaded and torch.equal(got, loaded.encode(PROMPT, [image(0), image(1)]))
    assert lazy.model_key() == loaded.model_key()


def test_a_lazy_pipeline_reads_no_weights_when_the_disk_cache_holds_the_encodings(checkpoint, tmp_path, monkeypatch):
    """What a restarted CLI or ComfyUI gets: the same numbers without reading the checkpoint's weights; a new
    prompt reads them then (its images' features still from the disk)."""
    cache = DiskCache(tmp_path / "cache")
    loaded = KosmosGPipeline.from_checkpoint(checkpoint)
    cond = loaded.encode(PROMPT, [image(0), image(1)], image_weights=[1.0, 0.5], disk_cache=cache)
    uncond = loaded.encode_unconditional("blurry", disk_cache=cache)
    expected = loaded.encode("<i> and <i> in the snow", [image(1), image(0)])

    def refuse(self):
        raise AssertionError("the weights were read")

    with monkeypatch.context() as patch:
        patch.setattr(UnreadWeights, "load", refuse)
        lazy = KosmosGPipeline.from_checkpoint(checkpoint, lazy=True)
        assert torch.equal(lazy.encode(PROMPT, [image(0), image(1)], image_weights=[1.0, 0.5], disk_cache=cache), cond)
        assert torch.equal(lazy.encode_unconditional("blurry", disk_cache=cache, batch_size=2), uncond.expand(2, -1, -1))
        assert torch.equal(lazy.image_embeddings([image(1)], disk_cache=cache), loaded.image_embeddings([image(1)]))
        assert not lazy.is_loaded
    forbid_model(lazy, monkeypatch, decoder=False)  # reads the weights; the vision tower must not run
    assert torch.equal(lazy.encode("<i> and <i> in the snow", [image(1), image(0)], disk_cache=cache), expected)


def test_a_lazy_pipeline_keys_by_what_the_loaded_weights_report(checkpoint, tmp_path, monkeypatch):
    """From a review: "cpu:0" keyed as "cpu:0" until the load and as "cpu" after (a miss, a second entry); packing
    asked for on a device it does not pack (the weights stay plain); a relative path after a change of folder."""
    lazy = KosmosGPipeline.from_checkpoint(checkpoint, device="cpu:0", lazy=True)
    key = lazy.model_key()
    lazy.load()
    assert lazy.model_key() == key == KosmosGPipeline.from_checkpoint(checkpoint, device="cpu:0").model_key()
    unread = UnreadWeights(checkpoint, lazy.cfg, torch.float32, torch.device("meta"), pack_cpu_linears=True)
    assert unread.linear_kernels() == "torch"  # pack_linears leaves non-CPU weights as they are
    monkeypatch.chdir(checkpoint.parent)
    relative = KosmosGPipeline.from_checkpoint(checkpoint.name, lazy=True)
    monkeypatch.chdir(tmp_path.parent)
    assert torch.equal(relative.encode("a dog"), lazy.encode("a dog"))


def test_a_lazy_pipeline_refuses_a_kernel_that_cannot_run_when_opened(checkpoint, monkeypatch):
    """From a review: cpu_kernel='few-row' where it cannot be built opened fine and failed at the first encode."""
    from kosmosg_core import cpu_linear
    from kosmosg_core.errors import DeviceError

    monkeypatch.setattr(cpu_linear, "_few_row_module", None)
    monkeypatch.setattr(cpu_linear, "few_row_kernel_unavailable_reason", lambda: "no C++ compiler")
    for lazy in (False, True):
        with pytest.raises(DeviceError, match="cpu_kernel='few-row' is unavailable: no C\\+\\+ compiler"):
            KosmosGPipeline.from_checkpoint(checkpoint, cpu_kernel="few-row", pack_cpu_linears=True, lazy=lazy)
    assert not KosmosGPipeline.from_checkpoint(checkpoint, cpu_kernel="auto", lazy=True).is_loaded  # oneDNN then


def test_a_lazy_pipeline_whose_file_changed_or_went_says_so(checkpoint, tmp_path):
    """Its keys hold the file as it was when opened: a file replaced before the weights are read is refused, not
    read under the old file's keys."""
    linked = KosmosGPipeline.from_checkpoint(checkpoint, lazy=True)
    os.link(checkpoint, checkpoint.with_name("backup.safetensors"))  # a backup tool's hard link: its ctime changes
    os.chmod(checkpoint, 0o600)
    assert linked.encode("a dog").shape[1] == 77  # found by a review: refused as "changed on disk"
    swapped = KosmosGPipeline.from_checkpoint(checkpoint, lazy=True)
    stat = checkpoint.stat()
    other = write_tiny_pack(tmp_path / "other", seed=1)[0]  # another model of the same layout: the same size
    assert other.stat().st_size == stat.st_size
    shutil.copyfile(other, checkpoint)  # what cp -p does: its bytes over the file, then the old times
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(CheckpointError, match="changed on disk after the model was opened"):
        swapped.encode("a dog")  # found by a review: loaded under the first file's keys
    lazy = KosmosGPipeline.from_checkpoint(checkpoint, lazy=True)
    os.utime(checkpoint, ns=(10**9, 10**9))  # e.g. retrained and written again
    with pytest.raises(CheckpointError, match="changed on disk after the model was opened .* load it again"):
        lazy.encode("a dog")
    gone = KosmosGPipeline.from_checkpoint(checkpoint, lazy=True)
    checkpoint.unlink()
    with pytest.raises(CheckpointNotFoundError, match="can no longer be read .* Put it back, or load it again"):
        gone.encode_unconditional()


def test_a_damaged_entry_is_recomputed(checkpoint, tmp_path):
    cache = DiskCache(tmp_path / "cache")
    cond = KosmosGPipeline.from_checkpoint(checkpoint).encode(PROMPT, [image(0), image(1)], disk_cache=cache)
    for path, _ in cache.entries():
        path.write_bytes(b"garbage")
    again = KosmosGPipeline.from_checkpoint(checkpoint).encode(PROMPT, [image(0), image(1)], disk_cache=cache)
    assert torch.equal(again, cond)


def test_a_pipeline_without_identity_refuses_a_disk_cache(pack, tmp_path):
    loaded = KosmosGPipeline.from_checkpoint(pack[0])
    pipe = KosmosGPipeline(loaded.model, loaded.tokenizer)
    with pytest.raises(ValueError, match="model_identity"):
        pipe.encode("a dog", disk_cache=DiskCache(tmp_path))
    named = KosmosGPipeline(loaded.model, loaded.tokenizer, model_identity="my-model|cpu")
    assert torch.equal(named.encode("a dog", disk_cache=DiskCache(tmp_path)), loaded.encode("a dog"))


def test_an_entry_damaged_to_inf_or_nan_is_a_miss_and_removed(tmp_path, caplog):
    """Found by a review: an entry whose values were damaged on disk (its header intact) was used: NaN
    conditioning (black pictures) without an error, or an error blaming the checkpoint on every later run."""
    cache = DiskCache(tmp_path / "cache")
    key = DiskCache.key("encoding", "model")
    cache.put(key, torch.full((2, 3), float("nan")))
    (path, _), = cache.entries()
    with caplog.at_level("WARNING", logger="kosmosg_core.disk_cache"):
        assert cache.get(key) is None
    assert "ignoring and removing the damaged entry" in caplog.text and "inf/NaN" in caplog.text
    assert not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir()  # a folder where the entry goes: no entry of the cache (nor a FIFO, nor a link): a miss, left alone
    caplog.clear()
    with caplog.at_level("WARNING", logger="kosmosg_core.disk_cache"):
        assert cache.get(key) is None
    assert caplog.text == "" and path.is_dir()


def test_damage_that_leaves_the_values_finite_is_a_miss(tmp_path, caplog):
    """Found by a review: one sign bit flipped on disk was served as the encoding (only inf/NaN were checked); each
    entry now carries its value's SHA-256."""
    cache = DiskCache(tmp_path / "cache")
    key = DiskCache.key("encoding", "model")
    cache.put(key, torch.arange(6, dtype=torch.float32))
    (path, _), = cache.entries()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x80  # the last float's sign
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="kosmosg_core.disk_cache"):
        assert cache.get(key) is None
    assert "do not match their checksum" in caplog.text and not path.exists()


def test_special_files_in_the_cache_are_never_read_nor_written_through(tmp_path):
    """Found by a review: a FIFO at an entry's path blocked the read forever; a link was read (and its target's date
    changed); a linked subfolder took writes outside the cache that no eviction counted."""
    cache = DiskCache(tmp_path / "cache")
    key, other = DiskCache.key("a"), DiskCache.key("b")
    cache.put(key, torch.ones(3))
    (path, _), = cache.entries()
    path.unlink()
    os.mkfifo(path)
    assert cache.get(key) is None  # at once
    path.unlink()
    target = tmp_path / "elsewhere.safetensors"
    DiskCache(tmp_path / "other").put(key, torch.ones(3))
    os.replace(DiskCache(tmp_path / "other")._path(key), target)
    before = target.stat().st_mtime_ns
    path.symlink_to(target)
    assert cache.get(key) is None and target.stat().st_mtime_ns == before
    outside = tmp_path / "outside"
    outside.mkdir()
    subfolder = cache._path(other).parent
    subfolder.symlink_to(outside, target_is_directory=True)
    cache.put(other, torch.ones(3))
    assert list(outside.iterdir()) == [] and cache.get(other) is None


def test_the_size_limit_holds_for_processes_sharing_the_folder(tmp_path, monkeypatch):
    """Found by a review: each process counted the folder once and then only its own writes (4 processes on a 5 MiB
    limit filled 16.8 MiB); a write counts the folder afresh once the last count is RECOUNT_SECONDS old."""
    from kosmosg_core import disk_cache

    clock = [0.0]
    monkeypatch.setattr(disk_cache.time, "monotonic", lambda: clock[0])
    entry = 4 * 1024  # floats: 16 KiB per entry
    caches = [DiskCache(tmp_path / "cache", max_bytes=100 * 1024) for _ in range(4)]
    for k in range(40):
        clock[0] += disk_cache.RECOUNT_SECONDS + 1  # one write per window and process
        caches[k % 4].put(DiskCache.key(k), torch.zeros(entry))
        assert caches[0].size_bytes() <= 100 * 1024


def test_an_entry_removed_while_it_is_read_is_a_miss(tmp_path, monkeypatch):
    """Found by a review: safetensors reads the header, torch opens the file again; removed in between (another
    process evicting, `cache --clear`), torch's RuntimeError escaped into Encode."""
    from kosmosg_core import files

    cache = DiskCache(tmp_path / "cache")
    key = DiskCache.key("a")
    cache.put(key, torch.ones(3))
    path = cache._path(key)

    def removed_meanwhile(where):
        path.unlink()
        raise RuntimeError(f"unable to open file <{where}> in read-only mode: No such file or directory (2)")

    monkeypatch.setattr(files, "read_safetensors", removed_meanwhile)
    assert cache.get(key) is None


def test_the_cli_reads_a_cache_folder_it_cannot_write(tmp_path, monkeypatch):
    """Found by a review: `encode --cache-dir RO --cache-max-gib 0` (read it, add nothing) was refused up front for a
    folder this user cannot write; an existing folder is used as it is (writes warn), a new one must be creatable."""
    import argparse
    import errno

    from kosmosg_core import cli, files
    from kosmosg_core.errors import OutputPathError

    folder = tmp_path / "shared-cache"
    DiskCache(folder).put(DiskCache.key("a"), torch.ones(3))

    def read_only(where):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files, "_new_temp_file", read_only)
    cache = cli._disk_cache(argparse.Namespace(cache_dir=folder, cache_max_bytes=0))
    assert torch.equal(cache.get(DiskCache.key("a")), torch.ones(3))
    with pytest.raises(OutputPathError, match="no file can be written"):
        cli._disk_cache(argparse.Namespace(cache_dir=tmp_path / "new", cache_max_bytes=0))


def test_a_damaged_entry_is_not_removed_when_another_process_rewrote_it(tmp_path, monkeypatch):
    """Found by a review: the damaged entry's removal could delete the good one another process had just written at
    the same path (one more recompute later)."""
    from kosmosg_core import files

    reader, writer = DiskCache(tmp_path / "cache"), DiskCache(tmp_path / "cache")
    key = DiskCache.key("a")
    reader.put(key, torch.ones(3))
    path = reader._path(key)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x80
    path.write_bytes(bytes(data))
    real_read = files.read_safetensors

    def rewritten_meanwhile(where):
        read = real_read(where)
        writer.put(key, torch.ones(3))  # a good entry replaces the damaged one while it is checked
        return read

    monkeypatch.setattr(files, "read_safetensors", rewritten_meanwhile)
    assert reader.get(key) is None
    monkeypatch.undo()
    assert torch.equal(reader.get(key), torch.ones(3))
