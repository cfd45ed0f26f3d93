"""kosmosg_core.files.save_safetensors: atomic, and the permissions a plain `open` would give."""

import errno
import os
import stat
import sys
import time

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


def test_the_mode_is_learnt_without_setting_the_umask(tmp_path, umask, monkeypatch):
    # os.umask changes the mask of the whole process: another thread creating a file meanwhile would get it
    umask(0o027)

    def no_umask(mask):
        raise AssertionError("os.umask called")

    monkeypatch.setattr(os, "umask", no_umask)
    path = save_safetensors({"x": torch.ones(2)}, tmp_path / "x.safetensors")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_safetensors({"x": torch.ones(2)}, tmp_path / "x.safetensors")

    def interrupted(*args):  # the temp file is written by now: fail between writing and renaming
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "chmod", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_safetensors({"x": torch.zeros(5)}, path)
    assert torch.equal(load_file(str(path))["x"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # no temp file left behind


def test_output_checks_name_the_problem_before_any_work(tmp_path, monkeypatch):
    from kosmosg_core.errors import OutputPathError
    from kosmosg_core.files import check_output_file, check_output_folder

    source = tmp_path / "model.safetensors"
    source.write_bytes(b"weights")
    for path, inputs, message in (
        (tmp_path / ("a" * 250 + ".safetensors"), (), r"the name is longer than the file system allows \(262 bytes, "
                                                       r"limit 255\); choose a shorter name\."),
        (tmp_path / ("f" * 256) / "x.safetensors", (), r"the name of its folder f+\.\.\. is longer than the file system "
                                                      r"allows \(256 bytes, limit 255\); choose a shorter folder name\."),
        (source, [source], "is the input file"),
        (tmp_path / "link.safetensors", [source], "is the input file"),  # the same file under another name
    ):
        if path.name == "link.safetensors":
            path.symlink_to(source)
        with pytest.raises(OutputPathError, match=message):
            check_output_file(path, "--out", inputs=inputs)
    assert check_output_file(tmp_path / "new.safetensors", "--out", inputs=[source, "", None])
    # an input no file system can hold is not the output file: comparing them made exists() raise, blamed on --out
    assert check_output_file(source, "--out", inputs=[tmp_path / ("i" * 300 + ".png")]) == source
    monkeypatch.setattr(os, "access", lambda *args: False)  # a folder this user may not write in (root may)
    for check in (lambda: check_output_file(tmp_path / "x.safetensors", "--out"),
                  lambda: check_output_folder(tmp_path / "new", "--output-dir")):
        with pytest.raises(OutputPathError, match=f"this user may not write in {tmp_path}"):
            check()


@pytest.mark.parametrize("name,message", [("out\0.png", "holds a NUL character"),
                                          ("out\ud800.png", "not valid text")])
def test_output_names_no_file_system_can_store_are_named(tmp_path, name, message):
    """A NUL or a lone surrogate (API clients send JSON such as "\\ud800") in a file name or prefix raised a bare
    ValueError 'embedded null byte' / UnicodeEncodeError from the os calls."""
    from kosmosg_core.errors import OutputPathError
    from kosmosg_core.files import check_output_file, check_output_folder

    with pytest.raises(OutputPathError, match=f"filename_prefix .*{message}"):
        check_output_file(tmp_path / name, "filename_prefix")
    with pytest.raises(OutputPathError, match=f"--output-dir .*{message}"):
        check_output_folder(tmp_path / name / "sub", "--output-dir")


def test_a_name_of_255_bytes_is_written_and_images_are_written_atomically(tmp_path, monkeypatch):
    """The temp file has a short name of its own (name + '.tmp' made a 255-byte name fail after the work)."""
    from PIL import Image

    from kosmosg_core.files import save_image

    longest = tmp_path / ("b" * 243 + ".safetensors")
    assert len(longest.name) == 255
    save_safetensors({"x": torch.ones(1)}, longest)
    assert torch.equal(load_file(str(longest))["x"], torch.ones(1))
    path = save_image(Image.new("RGB", (4, 4), (1, 2, 3)), tmp_path / "img.png")
    assert Image.open(path).getpixel((0, 0)) == (1, 2, 3)
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        save_image(Image.new("RGB", (4, 4), (9, 9, 9)), path)
    assert Image.open(path).getpixel((0, 0)) == (1, 2, 3)  # the earlier image stays whole
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([longest.name, "img.png"])


def test_an_image_carries_its_text_chunks_in_png_only(tmp_path):
    from PIL import Image

    from kosmosg_core.errors import OutputPathError
    from kosmosg_core.files import save_image

    path = save_image(Image.new("RGB", (2, 2)), tmp_path / "a.png", {"kosmosg": '{"prompt": "ein Bild von <i> – 猫"}'})
    assert Image.open(path).text == {"kosmosg": '{"prompt": "ein Bild von <i> – 猫"}'}
    with pytest.raises(OutputPathError, match=r"a\.jpg: only a \.png keeps the text"):
        save_image(Image.new("RGB", (2, 2)), tmp_path / "a.jpg", {"kosmosg": "{}"})
    assert not (tmp_path / "a.jpg").exists()


def test_a_failed_write_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    """e.g. a full disk: one line naming what was being written (the CLIs print OSErrors as one line)."""
    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        from safetensors import SafetensorError
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'x.safetensors'}: Error while serializing"):
        save_safetensors({"x": torch.ones(1)}, tmp_path / "x.safetensors")
    monkeypatch.undo()  # the real writer again; now the flush to disk fails
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match=r"\[Errno 28\] No space left on device \(writing .*y.safetensors\)"):
        save_safetensors({"x": torch.ones(1)}, tmp_path / "y.safetensors")
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _aged(path, seconds: float):
    os.utime(path, (time.time() - seconds, time.time() - seconds))
    return path


def test_temp_files_of_dead_writers_are_removed_on_posix_and_by_age_on_windows(tmp_path, monkeypatch):
    """Windows: os.kill(pid, 0) sends CTRL_C_EVENT to a process group instead of checking the pid, so no pid is
    probed there: a temp file goes once nothing has written to it for a day (a fresh one stays)."""
    import kosmosg_core.files as files

    dead = tmp_path / f"{files.TEMP_PREFIX}{_dead_pid()}-abc.tmp"
    dead.write_bytes(b"half-written")
    old = tmp_path / f"{files.TEMP_PREFIX}{_dead_pid()}-def.tmp"
    old.write_bytes(b"half-written")
    _aged(old, files.UNPROBED_TEMP_FILE_AGE + 60)
    monkeypatch.setattr(files, "_SWEPT", set())
    monkeypatch.setattr(files, "CAN_PROBE_PIDS", False)  # as on Windows
    monkeypatch.setattr(files.os, "kill", lambda *a: pytest.fail("os.kill called on Windows"))
    save_safetensors({"x": torch.zeros(2)}, tmp_path / "a.safetensors")
    assert dead.exists() and not old.exists()
    monkeypatch.undo()
    monkeypatch.setattr(files, "_SWEPT", set())
    save_safetensors({"x": torch.zeros(2)}, tmp_path / "b.safetensors")
    assert not dead.exists() and load_file(str(tmp_path / "b.safetensors"))["x"].shape == (2,)


def test_temp_files_of_other_machines_are_left_alone_until_a_day_old(tmp_path, monkeypatch):
    """A folder shared by several machines (multi-node runs on a network file system): a pid that is dead
    here may be a live writer on another machine, so another machine's temp file is removed only once
    nothing has written to it for a day (a run restarted in a new container leaves such files)."""
    import kosmosg_core.files as files

    pid = _dead_pid()
    other_tag = ('0' if files.HOST_TAG[0] != '0' else '1') + files.HOST_TAG[1:]
    other_machine = tmp_path / f"{files.TEMP_PREFIX}{pid}-{other_tag}-ab12cd34.tmp"
    other_machine_old = tmp_path / f"{files.TEMP_PREFIX}{pid}-{other_tag}-ef56ab78.tmp"
    this_machine = tmp_path / f"{files.TEMP_PREFIX}{pid}-{files.HOST_TAG}-ab12cd34.tmp"
    for tmp in (other_machine, other_machine_old, this_machine):
        tmp.write_bytes(b"half-written")
    _aged(other_machine_old, files.UNPROBED_TEMP_FILE_AGE + 60)
    monkeypatch.setattr(files, "_SWEPT", set())
    save_safetensors({"x": torch.zeros(2)}, tmp_path / "a.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.safetensors", other_machine.name])

def test_path_length_limits_sit_where_the_os_puts_them(tmp_path):
    """PATH_MAX counts the terminating NUL: a path of PATH_MAX bytes is refused by the OS (errno 36), one byte
    shorter is not; path_length_problem must agree at that boundary."""
    from kosmosg_core import files

    def path_of(size: int) -> str:  # absolute, folders of <= 200 bytes, exactly `size` bytes
        text = str(tmp_path)
        while len(text) + 202 < size:  # the last part gets at least 1 byte (a trailing "/" would be dropped)
            text += "/" + "d" * 200
        return text + "/" + "f" * (size - len(text) - 1)

    at_limit, below = path_of(files.PATH_MAX), path_of(files.PATH_MAX - 1)
    assert len(os.fsencode(at_limit)) == files.PATH_MAX and files.path_length_problem(at_limit)[1] == "path"
    with pytest.raises(OSError) as too_long:
        os.stat(at_limit)
    assert too_long.value.errno == errno.ENAMETOOLONG
    assert files.path_length_problem(below) is None
    with pytest.raises(FileNotFoundError):  # the OS takes the path (and finds nothing there)
        os.stat(below)


def test_windows_names_are_measured_in_utf16_units(monkeypatch):
    """NTFS allows 255 UTF-16 units: a 130-letter Cyrillic name is 142 units there (fine) but 272 UTF-8 bytes
    (too long on ext4)."""
    from kosmosg_core import files

    name = "Ж" * 130 + ".safetensors"
    assert files.path_length_problem(name)[1] == "name"
    monkeypatch.setattr(files, "WINDOWS", True)
    assert files.path_length_problem(name) is None
    assert files.path_length_problem("Ж" * 256)[1] == "name"


def test_content_fingerprint_follows_the_content_not_the_name(tmp_path):
    """A moved or renamed copy: the same fingerprint; a byte changed at either end, or another size: another; a
    folder file by file; nothing to read (missing, a name no file system holds): None."""
    import shutil

    from kosmosg_core.files import content_fingerprint

    original = tmp_path / "model.safetensors"
    original.write_bytes(bytes(range(256)) * 10000)  # 2.4 MiB: the middle is not read
    copy = tmp_path / "elsewhere" / "renamed.bin"
    copy.parent.mkdir()
    shutil.copy(original, copy)
    assert content_fingerprint(copy) == content_fingerprint(original) is not None
    data = bytearray(original.read_bytes())
    for position in (0, len(data) - 1):
        changed = bytearray(data)
        changed[position] ^= 1
        copy.write_bytes(bytes(changed))
        assert content_fingerprint(copy) != content_fingerprint(original), position
    copy.write_bytes(bytes(data[:-1]))
    assert content_fingerprint(copy) != content_fingerprint(original)
    folder = tmp_path / "folder"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "w.bin").write_bytes(b"1")
    before = content_fingerprint(folder)
    (folder / "unet" / "w.bin").write_bytes(b"2")
    assert before != content_fingerprint(folder) is not None
    assert content_fingerprint(tmp_path / "missing") is None and content_fingerprint(tmp_path / ("x" * 300)) is None


def test_a_folders_hidden_files_do_not_count_and_earlier_fingerprints_still_match(tmp_path):
    """Found by a review: huggingface_hub's .cache/ of timestamped download records changed a model folder's
    fingerprint (a resumed run was refused for its frozen model "holding other files"). Hidden files no longer
    count; a fingerprint taken as before (hidden files counted) is still recognised."""
    from kosmosg_core.files import content_fingerprint, holds_content

    folder = tmp_path / "text-encoder"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    plain = content_fingerprint(folder)
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "model.metadata").write_text("etag, 2026-12-07")
    earlier = content_fingerprint(folder, count_hidden=True)
    assert content_fingerprint(folder) == plain != earlier
    (folder / ".cache" / "huggingface" / "model.metadata").write_text("etag, 2026-12-08")  # downloaded again
    assert holds_content(folder, plain) and not holds_content(folder, "0" * 16)
    (folder / "model.safetensors").write_bytes(b"other weights")
    assert not holds_content(folder, plain) and not holds_content(folder, earlier)
    (folder / ".cache" / "huggingface" / "model.metadata").write_text("etag, 2026-12-07")
    (folder / "model.safetensors").write_bytes(b"weights")
    assert holds_content(folder, earlier)  # a run of an earlier version recorded this one


def test_sampled_fingerprint_sees_the_middle_of_a_file(tmp_path):
    """Found by a review: the first and last MiB of a checkpoint may both lie in parts a fine-tune left alone (the
    header, the embedded tokenizer, frozen tensors); blocks spread over the file tell such files apart."""
    from kosmosg_core.files import content_fingerprint, sampled_fingerprint

    data = bytearray(bytes(range(256)) * 40000)  # 10 MiB
    original, tuned = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    original.write_bytes(bytes(data))
    data[len(data) // 2: len(data) // 2 + len(data) // 10] = bytes(len(data) // 10)  # a tenth in the middle changed
    tuned.write_bytes(bytes(data))
    assert content_fingerprint(tuned) == content_fingerprint(original)  # its ends are the same
    assert sampled_fingerprint(tuned) != sampled_fingerprint(original) is not None
    assert sampled_fingerprint(tmp_path / "missing") is None


def test_a_killed_safetensors_write_leaves_nothing_behind_after_the_next_write(tmp_path, monkeypatch):
    """Found by a review: safetensors writes through a temp file of its own (.tmpXXXXXX beside its target): a
    `convert` killed mid-write left a full-size hidden file no sweep removed. Its target is now inside a folder
    named like the pack's temp files (…tmpd), which the next writer's sweep removes with what is in it."""
    import kosmosg_core.files as files

    seen = []
    real_save = __import__("safetensors.torch", fromlist=["save_file"]).save_file

    def watching(tensors, filename, metadata=None):
        seen.append(os.path.basename(os.path.dirname(filename)))  # where safetensors writes (and puts its own temp file)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr("safetensors.torch.save_file", watching)
    save_safetensors({"x": torch.ones(2)}, tmp_path / "a.safetensors")
    assert seen[0].startswith(files.TEMP_PREFIX) and seen[0].endswith(".tmpd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    killed = tmp_path / f"{files.TEMP_PREFIX}{_dead_pid()}-{files.HOST_TAG}-abcd1234.tmpd"  # a killed writer's
    killed.mkdir()
    (killed / ".tmpQx3yZa").write_bytes(b"half of a checkpoint")
    monkeypatch.setattr(files, "_SWEPT", set())
    save_safetensors({"x": torch.zeros(2)}, tmp_path / "b.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_a_folder_no_file_can_be_written_in_is_refused_before_the_work(tmp_path, monkeypatch):
    """Found by a review: os.access said yes (as root) for /sys/kernel, a read-only mount, /proc; generate sampled
    for minutes, then "Permission denied: '.../.kosmosg-...tmp'". Now the check writes a probe file, and a write
    that fails anyway names the file, not the temp file."""
    from kosmosg_core.errors import OutputPathError
    from kosmosg_core.files import atomic_output, check_output_file, check_output_folder

    folder = tmp_path / "mounted-read-only"
    folder.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(folder)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    for check, path in ((check_output_file, folder / "x.safetensors"), (check_output_folder, folder / "new" / "sub")):
        with pytest.raises(OutputPathError, match=rf"--out {path}: no file can be written in {folder} \(Read-only file "
                                                  r"system\); choose another path\."):
            check(path, "--out")
    with pytest.raises(OSError, match=rf"^\[Errno {errno.EROFS}\] Read-only file system \(writing {folder}/x\.bin\)$"):
        with atomic_output(folder / "x.bin"):
            pass
    assert list(folder.iterdir()) == []
    assert check_output_folder(tmp_path / "writable", "--out") == tmp_path / "writable"  # elsewhere: fine
    assert list(tmp_path.iterdir()) == [folder]  # the probe leaves nothing


def test_a_folder_where_files_can_be_made_but_not_removed_is_refused_saying_so(tmp_path, monkeypatch):
    """Found by a review: an append-only folder (chattr +a; a Windows create-but-not-delete ACL) was reported as "no
    file can be written", the probe left behind without a word."""
    from pathlib import Path

    from kosmosg_core.errors import OutputPathError
    from kosmosg_core.files import check_output_file

    real_unlink = Path.unlink

    def append_only(self, *args, **kwargs):
        if self.parent == tmp_path:
            raise OSError(errno.EPERM, "Operation not permitted", str(self))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", append_only)
    with pytest.raises(OutputPathError, match=rf"--out {tmp_path}/x\.bin: files can be made in {tmp_path} but not "
                                              r"removed or replaced \(Operation not permitted; it keeps \.kosmosg-.*\.tmp\)"):
        check_output_file(tmp_path / "x.bin", "--out")


def test_safetensors_format_reads_the_header_and_names_a_damaged_file(tmp_path):
    from kosmosg_core.files import safetensors_format

    marked = save_safetensors({"x": torch.zeros(2)}, tmp_path / "m.SafeTensors", {"format": "nano_sd15"})
    assert safetensors_format(marked) == "nano_sd15"  # the suffix in any case, as the loaders take it
    assert safetensors_format(save_safetensors({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")) is None
    (tmp_path / "model.ckpt").write_bytes(b"\0" * 16)
    assert safetensors_format(tmp_path / "model.ckpt") is None  # another suffix: not read
    (tmp_path / "notes.safetensors").write_text("not tensors")
    with pytest.raises(ValueError, match=r"notes.safetensors is not a readable .safetensors file \(.+\)\.$"):
        safetensors_format(tmp_path / "notes.safetensors")


def test_a_new_image_never_replaces_a_file_another_run_wrote_meanwhile(tmp_path, monkeypatch):
    """Found by a review: generate picked a free name, then os.replace wrote over whatever had appeared there since
    (two runs into one folder: one picture lost). The name is now taken in one step (a hard link where it is free)."""
    from PIL import Image

    from kosmosg_core import generate

    first = Image.new("RGB", (4, 4), (255, 0, 0))
    second = Image.new("RGB", (4, 4), (0, 0, 255))
    assert generate.save_new_image(first, tmp_path, "kosmosg_0_0").name == "kosmosg_0_0.png"
    real_lexists, looks = os.path.lexists, []

    def missed_once(path):  # the first look misses the file: as if the other run wrote it just after
        looks.append(path)
        return False if len(looks) == 1 else real_lexists(path)

    monkeypatch.setattr(generate.os.path, "lexists", missed_once)
    path = generate.save_new_image(second, tmp_path, "kosmosg_0_0")
    assert path.name == "kosmosg_0_0_1.png"
    assert Image.open(tmp_path / "kosmosg_0_0.png").getpixel((0, 0)) == (255, 0, 0)
    assert Image.open(path).getpixel((0, 0)) == (0, 0, 255)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kosmosg_0_0.png", "kosmosg_0_0_1.png"]  # no temp left


def test_a_new_image_into_a_folder_that_is_a_file_is_an_error_not_a_loop(tmp_path):
    """Found by a review: the folder's creation raised FileExistsError, taken for "name taken": names tried forever."""
    from PIL import Image

    from kosmosg_core import generate

    (tmp_path / "out").write_text("a file where the folder goes")
    with pytest.raises(OSError, match="out"):
        generate.save_new_image(Image.new("RGB", (2, 2)), tmp_path / "out", "kosmosg_0_0")


def test_without_hard_links_a_new_image_still_never_replaces_one(tmp_path, monkeypatch):
    """File systems without hard links (FAT, some network shares): the name is checked, then the file renamed."""
    from PIL import Image

    from kosmosg_core import generate

    def no_links(source, target):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    first = generate.save_new_image(Image.new("RGB", (2, 2), (9, 9, 9)), tmp_path, "k")
    second = generate.save_new_image(Image.new("RGB", (2, 2), (7, 7, 7)), tmp_path, "k")
    assert (first.name, second.name) == ("k.png", "k_1.png")
    assert Image.open(first).getpixel((0, 0)) == (9, 9, 9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.png", "k_1.png"]
