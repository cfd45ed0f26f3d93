"""`python -m kosmosg_core`: --help everywhere, encode contract, convert round trip, generate, clean errors."""

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kosmosg_core.config import NANO_SD15_FORMAT
from kosmosg_core.pipeline import KosmosGPipeline
from support.tiny_kosmosg import write_tiny_official

REPO = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ["encode", "convert", "info", "generate", "cache", "bench"]


def run_cli(*args, check=True, **env_overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **env_overrides)
    result = subprocess.run([sys.executable, "-m", "kosmosg_core", *map(str, args)], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for k in range(2):
        path = folder / f"subject{k}.png"
        Image.fromarray(np.random.default_rng(k).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_help_for_each_subcommand():
    assert "encode" in run_cli("--help").stdout
    for name in SUBCOMMANDS:
        out = run_cli(name, "--help").stdout
        assert f"usage: python -m kosmosg_core {name}" in out


def test_generate_records_its_settings_unless_told_not_to(monkeypatch):
    """--no-record reaches generate_images as record_settings=False (the default records)."""
    from kosmosg_core import cli, generate

    asked = []
    monkeypatch.setattr(generate, "generate_images", lambda **kwargs: asked.append(kwargs["record_settings"]) or [])
    base = ["generate", "--checkpoint", "k", "--sd-model", "s", "--prompt", "x"]
    for extra in ([], ["--no-record"]):
        cli.cmd_generate(cli.build_parser().parse_args(base + extra))
    assert asked == [True, False]


def _png_with_record(path, **changes):
    from kosmosg_core.config import PNG_SETTINGS_KEY
    from kosmosg_core.files import save_image

    record = dict(prompt="a <i> and a <i>", negative_prompt="dull", images=["dog.png", "hat.png"],
                  image_sha256=["0" * 64, "1" * 64], image_weights=[1.0, 0.5], effective_image_weights=[1.0, 0.5],
                  checkpoint="k.safetensors", sd_model="s.safetensors", seed=7, noise="per-image", num_images=4,
                  steps=20, guidance_scale=5.0, scheduler="ddim", dtype="bfloat16", device="cpu",
                  kosmosg_core_version="0.1.0", image_index=2, width=72, height=64)
    record.update(changes)
    save_image(Image.new("RGB", (8, 8)), path, text={PNG_SETTINGS_KEY: json.dumps(record)})
    return path


def test_generate_like_takes_the_records_settings_and_the_flags_given(monkeypatch, tmp_path, images, caplog):
    """--like: the record's settings (per-image noise: the picture's own seed and one picture; official noise:
    the run's seed and count), each flag given overriding them; images given are checked against the record."""
    from kosmosg_core import cli, generate

    asked = []
    monkeypatch.setattr(generate, "generate_images", lambda **kwargs: asked.append(kwargs) or [])
    png = _png_with_record(tmp_path / "per-image.png")
    files = ["--checkpoint", "k.safetensors", "--sd-model", "s.safetensors", "--image", str(images[0]), "--image",
             str(images[1])]
    cli.cmd_generate(cli.build_parser().parse_args(["generate", "--like", str(png), *files]))
    expected = dict(prompt="a <i> and a <i>", negative_prompt="dull", image_weights=[1.0, 0.5], noise="per-image",
                    steps=20, guidance_scale=5.0, scheduler="ddim", dtype="bfloat16", device="cpu", width=72,
                    height=64, seed=9, num_images=1)
    assert {k: asked[-1][k] for k in expected} == expected
    assert caplog.text.count("the pixels differ") == 2  # images[0], images[1] are not the recorded pictures
    cli.cmd_generate(cli.build_parser().parse_args(["generate", "--like", str(png), *files, "--seed", "3", "--steps",
                                                    "8", "--image-weights", "1, 1", "--negative-prompt", ""]))
    assert (asked[-1]["seed"], asked[-1]["steps"], asked[-1]["image_weights"], asked[-1]["negative_prompt"],
            asked[-1]["num_images"]) == (3, 8, [1.0, 1.0], "", 1)
    official = _png_with_record(tmp_path / "official.png", noise="official")
    cli.cmd_generate(cli.build_parser().parse_args(["generate", "--like", str(official), *files]))
    assert (asked[-1]["seed"], asked[-1]["num_images"]) == (7, 4)
    no_like = cli.build_parser().parse_args(["generate", "--checkpoint", "k", "--sd-model", "s", "--prompt", "x"])
    cli.cmd_generate(no_like)
    assert {k: asked[-1][k] for k in ("seed", "steps", "num_images", "noise", "dtype", "device", "negative_prompt")} == \
        {"seed": 0, "steps": 50, "num_images": 1, "noise": "per-image", "dtype": "float32", "device": "cpu",
         "negative_prompt": ""}


def test_generate_like_checks_the_record_against_what_is_given(monkeypatch, tmp_path, images, caplog):
    """A recorded device this machine lacks: an error saying it came from the record and how to override it; other
    model names, another image count: warnings; a new prompt drops the record's image weights (they were its
    images'); official noise on another device: a warning."""
    from kosmosg_core import cli, generate
    from kosmosg_core.errors import DeviceError, GenerationSettingsError

    asked = []
    monkeypatch.setattr(generate, "generate_images", lambda **kwargs: asked.append(kwargs) or [])
    run = lambda *argv: cli.cmd_generate(cli.build_parser().parse_args(["generate", *map(str, argv)]))  # noqa: E731
    on_gpu = _png_with_record(tmp_path / "gpu.png", device="cuda:1", noise="official")
    files = ["--checkpoint", "other.safetensors", "--sd-model", "s.safetensors", "--image", images[0], "--image",
             images[1]]
    with pytest.raises(DeviceError, match=r"--like .*gpu.png was made on device 'cuda:1'.*give --device"):
        run("--like", on_gpu, *files)
    with caplog.at_level(logging.WARNING):
        run("--like", on_gpu, *files, "--device", "cpu")
    assert asked[-1]["device"] == "cpu"
    assert "made with --checkpoint k.safetensors, not other.safetensors" in caplog.text
    assert "official noise was drawn on cuda:1 in bfloat16; drawn on cpu in bfloat16 it is other noise" in caplog.text
    png = _png_with_record(tmp_path / "r.png")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run("--like", png, "--checkpoint", "k.safetensors", "--sd-model", "s.safetensors", "--image", images[0])
    assert "its prompt took 2 image(s) (dog.png, hat.png), 1 are given" in caplog.text
    assert asked[-1]["image_weights"] is None  # not the record's two weights for one image
    run("--like", png, "--checkpoint", "k.safetensors", "--sd-model", "s.safetensors", "--prompt", "a <i>", "--image",
        images[0])
    assert asked[-1]["prompt"] == "a <i>" and asked[-1]["image_weights"] is None
    run("--like", png, "--checkpoint", "k.safetensors", "--sd-model", "s.safetensors", "--prompt", "plain text")
    assert asked[-1]["prompt"] == "plain text" and asked[-1]["image_weights"] is None
    caplog.clear()  # the recorded device spelled another way is the same device: the same official noise
    official = _png_with_record(tmp_path / "o.png", noise="official", device="cuda")
    with caplog.at_level(logging.WARNING):
        run("--like", _png_with_record(tmp_path / "c.png", noise="official"), "--checkpoint", "k.safetensors",
            "--sd-model", "s.safetensors", "--image", images[0], "--image", images[1], "--device", "CPU")
    assert "other noise" not in caplog.text
    assert cli._device_name("cuda") == cli._device_name("CUDA:0") != cli._device_name("cuda:1")
    assert cli._device_name("cpu:0") == cli._device_name("CPU") == "cpu" and cli._device_name("no such") == "no such"

    def refuse(**kwargs):  # e.g. steps the SD model's scheduler cannot run, found once it is loaded
        raise GenerationSettingsError("ddim cannot run 1000 steps with the settings in scheduler_config.json.")

    monkeypatch.setattr(generate, "generate_images", refuse)
    with pytest.raises(GenerationSettingsError, match=r"1000 steps .*\(--like .*o.png: the settings not given as "
                                                      "flags are its record's; give the one named as a flag"):
        run("--like", official, "--checkpoint", "k.safetensors", "--sd-model", "s.safetensors", "--image", images[0],
            "--image", images[1], "--device", "cpu")


@pytest.mark.parametrize("change, problem", [
    ({"seed": "7"}, "seed must be a whole number"), ({"image_index": "2"}, "image_index is '2'"),
    ({"images": 3}, "images is 3"), ({"image_sha256": 5}, "image_sha256 is 5"),
    ({"image_sha256": []}, "image_sha256 is []"), ({"scheduler": [1]}, "scheduler is [1]"),
    ({"num_images": 10**9}, "num_images must be a whole number between 1 and 1024"),
    ({"seed": True}, "seed must be a whole number"), ({"images": "abc"}, "images is 'abc'"),
    ({"image_index": 4}, "image_index is 4"), ({"prompt": ["a"]}, "prompt is ['a']"),
    ({"dtype": "float8"}, "dtype is 'float8'"), ({"steps": 0}, "steps must be a whole number between 1 and 1000"),
    ({"image_weights": [1, "x"]}, "image_weights is [1, 'x']"), ({"requested_width": 70}, "width must be a multiple of 8"),
    ({"requested_width": 800000}, "width must be a whole number between 8 and 8192"),
    ({"requested_height": True}, "requested_height is True"), ({"steps": 10**9}, "steps must be a whole number between"),
    # found by a review: numbers too big for a float were a bare OverflowError
    ({"image_weights": [10**400, 1.0]}, "image_weights is [1000000"), ({"guidance_scale": 10**400}, "guidance_scale is 1000"),
    ({"image_weights": [float("nan"), 1.0]}, "image_weights is [nan, 1.0]"),
    # checked as the arguments are, so the error names the record, not a flag that was never given
    ({"image_weights": [11, 1.0]}, "Image weight 11 (image 1"), ({"prompt": "a <i> and <i> and <i>"}, "has 3 <i>"),
    ({"prompt": "a <i:abc> and <i>"}, "Placeholder 1 of the prompt"), ({"negative_prompt": "a <i>"}, "text only"),
    ({"num_images": "4"}, "num_images is '4'"), ({"width": "abc"}, "width is 'abc'"),
    ({"width": -64}, "width must be a whole number between 8"), ({"prompt": "a \ud800 <i> <i>"}, "not valid text"),
    ({"checkpoint_fingerprint": 5}, "checkpoint_fingerprint is 5"),
])
def test_generate_like_refuses_a_record_it_would_not_write(tmp_path, images, capsys, change, problem):
    """A PNG's record is untrusted input: every field of another type or out of range is a one-line error naming
    the file and the field, before anything loads."""
    from kosmosg_core.cli import main

    png = _png_with_record(tmp_path / "odd.png", **change)
    code = main(["generate", "--like", str(png), "--checkpoint", "k", "--sd-model", "s", "--image", str(images[0]),
                 "--image", str(images[1])])
    err = capsys.readouterr().err
    assert code == 2 and "odd.png" in err and problem in err and "Traceback" not in err, err


def test_generate_like_compares_the_models_by_content(monkeypatch, tmp_path, images, caplog):
    """From a review: by name only, a renamed copy warned and another model of the same name did not. A record's
    fingerprint (size, first and last MiB) tells them apart; a record without one is compared by name."""
    import shutil

    from kosmosg_core import cli, generate
    from kosmosg_core.files import content_fingerprint

    monkeypatch.setattr(generate, "generate_images", lambda **kwargs: [])
    original = tmp_path / "k.safetensors"
    original.write_bytes(bytes(range(256)) * 20000)
    folder = tmp_path / "sd"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "w.bin").write_bytes(b"\1" * 5000)
    png = _png_with_record(tmp_path / "r.png", checkpoint_fingerprint=content_fingerprint(original),
                           sd_model="sd", sd_model_fingerprint=content_fingerprint(folder))
    copy = tmp_path / "renamed.safetensors"
    shutil.copy(original, copy)
    other = tmp_path / "other" / "k.safetensors"
    other.parent.mkdir()
    other.write_bytes(bytes(range(256)) * 19999 + bytes(256))  # the same size and name, the last bytes differ
    files = ["--sd-model", str(folder), "--image", str(images[0]), "--image", str(images[1])]
    for checkpoint, warned in ((copy, False), (original, False), (other, True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            cli.cmd_generate(cli.build_parser().parse_args(["generate", "--like", str(png), "--checkpoint",
                                                            str(checkpoint), *files]))
        assert ("another --checkpoint than k.safetensors" in caplog.text) == warned, (checkpoint, caplog.text)
        assert "--sd-model" not in caplog.text
    (folder / "unet" / "w.bin").write_bytes(b"\2" * 5000)  # a folder model: any file's content counts
    with caplog.at_level(logging.WARNING):
        cli.cmd_generate(cli.build_parser().parse_args(["generate", "--like", str(png), "--checkpoint", str(copy),
                                                        *files]))
    assert "another --sd-model than sd" in caplog.text


def test_generate_like_shows_a_records_text_escaped_and_short(tmp_path, images, capsys, caplog):
    """A record's names reach the terminal: escape codes and new lines are shown escaped, a megabyte is cut."""
    from kosmosg_core.cli import main

    png = _png_with_record(tmp_path / "ansi.png", images=["\x1b]0;pwned\x07\x1b[2K\rerror: run rm -rf ~\n", "b"],
                           checkpoint="\x1b[31mred" + "x" * 10**6)
    with caplog.at_level(logging.WARNING):
        main(["generate", "--like", str(png), "--checkpoint", "k", "--sd-model", "s.safetensors", "--image",
              str(images[0]), "--out-dir", str(tmp_path / "out")])
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2 and "pwned" in warnings[1] and "red" in warnings[0], warnings
    assert all("\x1b" not in text and "\n" not in text and len(text) < 600 for text in warnings), warnings
    capsys.readouterr()
    huge = _png_with_record(tmp_path / "huge.png", device="x" * 10**6)
    assert main(["generate", "--like", str(huge), "--checkpoint", "k", "--sd-model", "s"]) == 2
    assert len(capsys.readouterr().err) < 1000


def test_generate_like_refuses_hostile_pngs_in_one_line(tmp_path, capsys):
    """Found by a review: JSON nested 200000 deep (RecursionError), a compressed text chunk that inflates past PIL's
    limit (ValueError), a PNG claiming 200000 x 200000 pixels (DecompressionBombError), an integer of 5000 digits
    (not valid JSON, not "missing: all"): each a one-line error naming the file."""
    import struct
    import zlib

    from PIL import PngImagePlugin

    from kosmosg_core.cli import main
    from kosmosg_core.config import PNG_SETTINGS_KEY
    from kosmosg_core.files import save_image

    nested = tmp_path / "nested.png"
    save_image(Image.new("RGB", (8, 8)), nested, text={PNG_SETTINGS_KEY: "[" * 200000 + "]" * 200000})
    digits = tmp_path / "digits.png"
    save_image(Image.new("RGB", (8, 8)), digits, text={PNG_SETTINGS_KEY: '{"seed": ' + "9" * 5000 + "}"})
    inflating = tmp_path / "inflating.png"
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_SETTINGS_KEY, "a" * 2 * 2**20, zip=True)
    Image.new("RGB", (8, 8)).save(inflating, pnginfo=info)
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (8, 8)).save(bomb)
    data = bytearray(bomb.read_bytes())
    ihdr = bytes(data[12:17 + 12])  # "IHDR" + 13 bytes
    ihdr = ihdr[:4] + struct.pack(">II", 200000, 200000) + ihdr[12:]
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    bomb.write_bytes(bytes(data))
    for png, message in ((nested, "not valid JSON"), (digits, "not valid JSON"), (inflating, "cannot read it as a PNG"),
                         (bomb, "cannot read it as a PNG")):
        assert main(["generate", "--like", str(png), "--checkpoint", "k", "--sd-model", "s"]) == 2
        err = capsys.readouterr().err
        assert png.name in err and message in err and len(err.splitlines()) == 1, err[:500]


def test_generate_like_errors_are_one_line(tmp_path, images):
    png = _png_with_record(tmp_path / "r.png")
    bare = tmp_path / "bare.png"
    Image.new("RGB", (8, 8)).save(bare)
    damaged = _png_with_record(tmp_path / "d.png", seed=None)
    from kosmosg_core.config import PNG_SETTINGS_KEY
    from kosmosg_core.files import save_image
    save_image(Image.new("RGB", (8, 8)), damaged, text={PNG_SETTINGS_KEY: '{"prompt": "x"'})
    not_png = tmp_path / "notes.txt"
    not_png.write_text("hello")
    cases = [(["--like", png], "its prompt takes 2 image(s) (dog.png, hat.png"),
             (["--like", bare], "holds no record of its settings"),
             (["--like", damaged], "record is damaged or not generate's"),
             (["--like", not_png], "cannot read it as a PNG"),
             ([], "generate needs --prompt (or --like")]
    for extra, message in cases:
        result = run_cli("generate", "--checkpoint", "k.safetensors", "--sd-model", "s.safetensors", *extra,
                         "--out-dir", tmp_path / "out", check=False)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_flag_given_twice_is_refused_by_name(capsys):
    """argparse keeps the last of two values without a word; the Python commands here refuse instead (one parser
    class: train/ and scripts/start_comfyui.py are checked in their own tests). Repeatable flags (--image) and
    switches (-v) may repeat."""
    from kosmosg_core.cli import build_parser
    from train.nano import judge, nano_tokenizer, world

    parser = build_parser()
    base = ["encode", "--checkpoint", "k.safetensors", "--prompt", "<i> and <i>", "--out", "o.safetensors"]
    for extra, flag, values in ((["--prompt", "again"], "--prompt", "('<i> and <i>', then 'again')"),
                                (["--dtype=float32", "--dtype", "bfloat16"], "--dtype", "('float32', then 'bfloat16')")):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(base + extra)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"python -m kosmosg_core encode: error: {flag} is given twice on the command line {values}; give it once." in err
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--checkpoint", "k", "--sd-model", "s", "--prompt", "x", "--steps", "20",
                           "--steps", "50"])
    assert "--steps is given twice on the command line (20, then 50)" in capsys.readouterr().err
    args = parser.parse_args(["-v", "-v"] + base + ["--image", "a.png", "--image", "b.png"])
    assert [Path(p).name for p in args.image] == ["a.png", "b.png"] and args.verbose and args.dtype == "float32"
    assert not hasattr(args, "_flags_given")  # the parser's bookkeeping stays inside it
    for main, argv in ((world.main, ["--out", "x", "--count", "1", "--count", "2"]),
                       (judge.main, ["--samples", "1", "--samples", "2"]),
                       (nano_tokenizer.main, ["--out", "x", "--out", "y"])):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and "is given twice on the command line" in capsys.readouterr().err


def test_encode_writes_cond(pack, images, tmp_path):
    ckpt, tok_dir, _ = pack
    out = tmp_path / "cond.safetensors"
    run_cli("encode", "--checkpoint", ckpt, "--tokenizer", tok_dir, "--prompt", "a photo of <i> wearing <i>",
            "--image", images[0], "--image", images[1], "--out", out)
    cond = load_file(str(out))
    assert list(cond) == ["cond"] and cond["cond"].shape == (1, 77, 768)
    expected = KosmosGPipeline.from_checkpoint(ckpt).encode("a photo of <i> wearing <i>", list(images))
    assert torch.allclose(cond["cond"], expected, atol=1e-5)


def test_encode_image_weights_scale_each_image(pack, images, tmp_path):
    out = tmp_path / "weighted.safetensors"
    prompt = "a photo of <i> wearing <i>"
    run_cli("encode", "--checkpoint", pack[0], "--prompt", prompt, "--image", images[0], "--image", images[1],
            "--image-weights", "1.0, 0.5", "--out", out)
    with safe_open(str(out), "pt") as f:
        cond, metadata = f.get_tensor("cond"), f.metadata()
    pipe = KosmosGPipeline.from_checkpoint(pack[0])
    assert torch.allclose(cond, pipe.encode(prompt, list(images), image_weights=[1.0, 0.5]), atol=1e-5)
    assert not torch.allclose(cond, pipe.encode(prompt, list(images)), atol=1e-3)
    assert json.loads(metadata["image_weights"]) == [1.0, 0.5]
    # a weight written in the prompt multiplies with --image-weights; the file records each image's product
    written = tmp_path / "written.safetensors"
    run_cli("encode", "--checkpoint", pack[0], "--prompt", "a photo of <i:0.5> wearing <i>", "--image", images[0],
            "--image", images[1], "--image-weights", "2, 0.5", "--out", written)
    with safe_open(str(written), "pt") as f:
        assert torch.allclose(f.get_tensor("cond"), cond, atol=1e-6)
        assert json.loads(f.metadata()["image_weights"]) == [1.0, 0.5]
        assert f.metadata()["prompt"] == "a photo of <i:0.5> wearing <i>"


def test_encode_cache_dir_is_read_by_later_runs(pack, images, tmp_path):
    """--cache-dir keeps the encoding, and a later run reads it instead of encoding: an entry replaced by zeros
    comes back as zeros (the unconditional prompt too)."""
    from kosmosg_core.disk_cache import DiskCache

    cache_dir, first, second = tmp_path / "cache", tmp_path / "1.safetensors", tmp_path / "2.safetensors"
    args = ["encode", "--checkpoint", pack[0], "--prompt", "a photo of <i>", "--image", images[0], "--cache-dir", cache_dir]
    run_cli(*args, "--out", first)
    cache = DiskCache(cache_dir)
    entries = {tuple(load_file(str(path))["value"].shape): path for path, _ in cache.entries()}
    assert set(entries) == {(1, 77, 768), (4, 64)}  # the encoding and the image's features (tiny model: 4 x 64)
    zeros = torch.zeros(1, 77, 768)
    from kosmosg_core.disk_cache import CHECKSUM_NAME, _checksum
    from kosmosg_core.files import save_safetensors
    save_safetensors({"value": zeros}, entries[(1, 77, 768)], metadata={CHECKSUM_NAME: _checksum(zeros)})
    log = run_cli("-v", *args, "--out", second).stderr
    assert torch.equal(load_file(str(second))["cond"], zeros)
    assert not torch.equal(load_file(str(first))["cond"], zeros)
    assert "reading the weights" not in log  # nothing to compute: the checkpoint's weights are never read
    log = run_cli("-v", *args[:4], "a photo of <i> again", *args[5:], "--out", second).stderr
    assert "reading the weights" in log  # a new prompt is computed (its image's features from the cache)
    # the unconditional prompt, and the size limit: 0.0001 GiB (105 kB) holds no 236 kB entry
    run_cli("encode", "--checkpoint", pack[0], "--prompt", "", "--cache-dir", cache_dir, "--cache-max-gib", "0.0001",
            "--out", tmp_path / "u.safetensors")
    assert cache.size_bytes() <= 0.0001 * 2**30 and len(cache.entries()) == 0  # the entry alone is over the limit
    for bad in ("-1", "nan", "inf", "x"):
        result = run_cli(*args, "--out", second, "--cache-max-gib", bad, check=False)
        assert result.returncode == 2 and "--cache-max-gib" in result.stderr and "not a number of GiB" in result.stderr


def test_cache_command_tells_the_size_and_clears(tmp_path):
    from kosmosg_core.disk_cache import DiskCache

    cache = DiskCache(tmp_path / "cache")
    for k in range(3):
        cache.put(cache.key(k), torch.zeros(1000))
    other = tmp_path / "cache" / "readme.txt"
    other.write_text("not an entry")
    out = run_cli("cache", "--dir", tmp_path / "cache").stdout
    assert out.startswith(f"{tmp_path / 'cache'}: 3 entries, ") and out.strip().endswith(" MiB")
    out = run_cli("cache", "--dir", tmp_path / "cache", "--clear").stdout
    assert out.startswith("removed 3 entries") and cache.entries() == [] and other.is_file()
    assert run_cli("cache", "--dir", tmp_path / "cache").stdout.strip().endswith(": 0 entries, 0.0 MiB")
    for folder, problem in ((tmp_path / "nothing", "does not exist"), (other, "is not a folder")):
        result = run_cli("cache", "--dir", folder, "--clear", check=False)
        assert result.returncode == 2 and f"--dir {folder} {problem}" in result.stderr and "Traceback" not in result.stderr


def test_generate_passes_its_disk_cache(monkeypatch, tmp_path):
    from kosmosg_core import cli, generate

    asked = []
    monkeypatch.setattr(generate, "generate_images", lambda **kwargs: asked.append(kwargs["disk_cache"]) or [])
    base = ["generate", "--checkpoint", "k", "--sd-model", "s", "--prompt", "x"]
    for extra in ([], ["--cache-dir", str(tmp_path / "c"), "--cache-max-gib", "2"]):
        cli.cmd_generate(cli.build_parser().parse_args(base + extra))
    assert asked[0] is None
    assert asked[1].directory == tmp_path / "c" and asked[1].max_bytes == 2 * 2**30


def test_encode_empty_prompt_is_unconditional(pack, tmp_path):
    out = tmp_path / "uncond.safetensors"
    run_cli("encode", "--checkpoint", pack[0], "--prompt", "", "--out", out, "--dtype", "bfloat16")
    cond = load_file(str(out))["cond"]
    expected = KosmosGPipeline.from_checkpoint(pack[0]).encode_unconditional()
    assert cond.shape == (1, 77, 768) and cond.dtype == torch.float32
    assert torch.allclose(cond, expected, atol=0.05 * expected.abs().max())


def test_paths_after_equals_sign_expand_home(pack, images, tmp_path):
    # `--out=~/x` reaches the program with the `~` unexpanded (the shell expands only a leading `~`)
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    shutil.copy(pack[0], home / "models" / "kosmosg.safetensors")
    shutil.copy(images[0], home / "subject.png")
    run_cli("encode", "--checkpoint=~/models/kosmosg.safetensors", f"--tokenizer={pack[1]}", "--prompt", "a photo of <i>",
            "--image=~/subject.png", "--out=~/cond.safetensors",
            "--cpu-kernel", "onednn",  # the few-row kernel would be built anew under this HOME's cache (~30 s)
            HOME=str(home), USERPROFILE=str(home))
    assert load_file(str(home / "cond.safetensors"))["cond"].shape == (1, 77, 768)
    assert not (REPO / "~").exists()


@pytest.mark.parametrize("args, message", [
    (["--prompt", "<i> and <i>"], r"2 <i> placeholder\(s\) but 0 image"),
    (["--prompt", "x", "--dtype", "float64"], "invalid choice"),
    (["--prompt", "x", "--device", "cuda"] if not torch.cuda.is_available() else ["--prompt", "x", "--device", "tpu"],
     "no CUDA GPU|Unknown device|Unsupported device"),
])
def test_encode_errors_are_one_line(pack, tmp_path, args, message):
    result = run_cli("encode", "--checkpoint", pack[0], "--out", tmp_path / "x.safetensors", *args, check=False)
    assert result.returncode == 2
    assert re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr


def test_encode_missing_checkpoint_and_bad_image(pack, tmp_path):
    result = run_cli("encode", "--checkpoint", tmp_path / "missing.pt", "--prompt", "x", "--out", tmp_path / "o.safetensors",
                     check=False)
    assert result.returncode == 2 and "not found" in result.stderr and "Traceback" not in result.stderr
    verbose = run_cli("--verbose", "encode", "--checkpoint", tmp_path / "missing.pt", "--prompt", "x", "--out",
                      tmp_path / "o.safetensors", check=False)  # --verbose: the same error, with its traceback for a report
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr and "CheckpointNotFoundError" in verbose.stderr
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    result = run_cli("encode", "--checkpoint", pack[0], "--prompt", "<i>", "--image", bad, "--out", tmp_path / "o.safetensors",
                     check=False)
    assert result.returncode == 2 and "bad.jpg" in result.stderr and "Traceback" not in result.stderr


def test_encode_never_overwrites_its_inputs_and_file_system_errors_are_one_line(pack, images, tmp_path):
    import shutil

    model = shutil.copy(pack[0], tmp_path / "model.safetensors")
    before = Path(model).read_bytes()
    for out in (model, images[0]):
        result = run_cli("encode", "--checkpoint", model, "--prompt", "a <i>", "--image", images[0], "--out", out,
                         check=False)
        assert result.returncode == 2 and "is the input file" in result.stderr and "Traceback" not in result.stderr
    assert Path(model).read_bytes() == before
    # nor any other file: only an earlier encode's output is replaced (a review saw a PNG, a tokenizer file and a model
    # overwritten), and the name is *.safetensors (what ComfyUI's Load Conditioning lists)
    picture, other_model = tmp_path / "picture.png", tmp_path / "other.safetensors"
    shutil.copy(images[1], picture)
    shutil.copy(pack[0], other_model)
    for out, message in ((picture, r"--out .*picture\.png: encode writes a \.safetensors file .*; name it "
                                   r"\*\.safetensors\."),
                         (other_model, r"--out .*other\.safetensors exists and is not a conditioning encode wrote; "
                                       r"choose another name \(or delete that file first\)\.")):
        before = out.read_bytes()
        result = run_cli("encode", "--checkpoint", model, "--prompt", "a dog", "--out", out, check=False)
        assert result.returncode == 2 and re.search(message, result.stderr), result.stderr
        assert out.read_bytes() == before
    again = tmp_path / "again.safetensors"
    for _ in range(2):  # an earlier encode's output is replaced
        run_cli("encode", "--checkpoint", model, "--prompt", "a dog", "--out", again)
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)  # reading it would block forever
    result = run_cli("encode", "--checkpoint", fifo, "--prompt", "x", "--out", tmp_path / "o.safetensors", check=False)
    assert result.returncode == 2 and "is not a regular file" in result.stderr
    result = run_cli("encode", "--checkpoint", model, "--prompt", "x", "--out", fifo, check=False)  # nor as --out
    assert result.returncode == 2 and re.search(r"--out .*fifo\.safetensors exists and is not a regular file",
                                                result.stderr), result.stderr


def test_paths_too_long_for_the_file_system_are_typed_errors(pack, images, tmp_path):
    """A name over 255 bytes made exists() itself raise: a bare OSError ("File name too long") where every other bad
    path gets the typed error naming the input and the fix. (Over-long folder names and whole paths: test_checkpoint.)"""
    name = "c" * 300 + ".pt"  # 303 bytes
    too_long = tmp_path / name
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    existing_out = tmp_path / "existing.safetensors"  # the check that --out is no input compared them: it raised
    save_file({"cond": torch.zeros(1, 77, 768)}, str(existing_out))  # an earlier encode's: may be replaced
    existing = existing_out.read_bytes()
    too_long_name = r"the name is longer than the file system allows \(303 bytes, limit 255\)"
    checkpoint = "Kosmos-G checkpoint .*: " + too_long_name + r"; rename the file\."
    cases = [
        (["info", "--checkpoint", too_long], checkpoint),
        (["convert", "--checkpoint", too_long, "--out", tmp_path / "o.safetensors"], checkpoint),
        (["encode", "--checkpoint", too_long, "--prompt", "x", "--out", existing_out], checkpoint),
        (["encode", "--checkpoint", pack[0], "--tokenizer", too_long, "--prompt", "x", "--out", tmp_path / "o.safetensors"],
         "Tokenizer folder .*: " + too_long_name + r"; rename the folder\."),
        (["encode", "--checkpoint", pack[0], "--prompt", "a <i>", "--image", images[0].with_name(name), "--out",
          tmp_path / "o.safetensors"], "Image file .*: " + too_long_name + r"; rename the file\."),
        (["encode", "--checkpoint", pack[0], "--prompt", "x", "--out", too_long], "--out .*: " + too_long_name +
         r"; choose a shorter name\."),
        (["generate", "--checkpoint", too_long, "--sd-model", a_file, "--prompt", "x", "--out-dir", tmp_path], checkpoint),
        (["generate", "--checkpoint", pack[0], "--sd-model", too_long, "--prompt", "x"],
         "SD1.5 model .*: " + too_long_name + r"; rename the file or folder\."),
        (["generate", "--checkpoint", pack[0], "--sd-model", a_file, "--sd-config", too_long, "--prompt", "x"],
         "SD1.5 config folder .*: " + too_long_name + r"; rename the folder\."),
        (["generate", "--checkpoint", pack[0], "--sd-model", a_file, "--prompt", "x", "--out-dir", too_long],
         "The output folder .*: " + too_long_name + r"; choose a shorter name\."),
    ]
    for args, message in cases:
        result = run_cli(*args, check=False)
        error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(error_lines) == 1 and re.search(message, error_lines[0]), (args, result.stderr)
        assert "Traceback" not in result.stderr and "Errno" not in result.stderr, (args, result.stderr)
        assert len(error_lines[0]) < 500, error_lines[0]  # the path shortened in the message
    assert existing_out.read_bytes() == existing


def test_generation_settings_checked_for_api_callers_too():
    from kosmosg_core.errors import GenerationSettingsError
    from kosmosg_core.generate import check_generation_settings

    check_generation_settings(50, 6.0, 2**64 - 4, 4, 512, 512, "ddim")
    with pytest.raises(GenerationSettingsError, match="scheduler 'euler' is not known: use one of dpm, ddim, pndm"):
        check_generation_settings(50, 6.0, 0, 1, 512, 512, "euler")
    with pytest.raises(GenerationSettingsError, match="seed must be"):  # image 4 would need seed 2**64
        check_generation_settings(50, 6.0, 2**64 - 4, 5, 512, 512)


def test_bad_outputs_and_arguments_are_refused_before_loading(tmp_path):
    """A checkpoint that does not exist: each error below proves its check ran before the load."""
    missing = tmp_path / "missing.pt"
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    no_unet = tmp_path / "no-unet"  # diffusers says no-unet/ itself lacks a config.json; for --sd-config it blames the model file
    for name in ("model_index.json", "vae/config.json", "scheduler/scheduler_config.json"):
        (no_unet / name).parent.mkdir(parents=True, exist_ok=True)
        (no_unet / name).write_text("{}")
    nano_sd = tmp_path / "nano-sd15.safetensors"  # the pack's nano image model: its layout is fixed
    save_file({"x": torch.zeros(1)}, str(nano_sd), metadata={"format": NANO_SD15_FORMAT})
    cases = [
        (["encode", "--prompt", "x", "--out", tmp_path], "is a folder; give the path of a file"),
        (["encode", "--prompt", "x", "--out", a_file / "cond.safetensors"], "a_file.txt is a file, not a folder"),
        (["encode", "--prompt", "<i>", "--image", "", "--out", tmp_path / "o.safetensors"], "argument --image: an empty path"),
        (["encode", "--prompt", "", "--image", a_file, "--out", tmp_path / "o.safetensors"], "takes no images"),
        (["convert", "--out", tmp_path / "converted.pt"], "must end in .safetensors"),
        (["generate", "--sd-model", tmp_path, "--prompt", "x", "--out-dir", a_file], "a_file.txt is a file, not a folder"),
        (["generate", "--sd-model", tmp_path / "sd.safetensors", "--prompt", "x"], "SD1.5 model not found"),
        (["generate", "--sd-model", a_file, "--sd-config", tmp_path / "nope", "--prompt", "x"],
         "SD1.5 config folder not found"),
        (["generate", "--sd-model", empty, "--prompt", "x"], f"SD1.5 model folder {empty} has no model_index.json"),
        (["generate", "--prompt", "x"], "Kosmos-G checkpoint not found"),  # no --sd-model: its own U-Net, VAE are read
        (["generate", "--sd-model", no_unet, "--prompt", "x"], f"SD1.5 model folder {no_unet} has no unet/config.json"),
        (["generate", "--sd-model", a_file, "--sd-config", no_unet, "--prompt", "x"],
         f"SD1.5 config folder {no_unet} has no unet/config.json"),
        (["generate", "--sd-model", nano_sd, "--sd-config", no_unet, "--prompt", "x"],
         "is the pack's nano image model, whose layout is fixed: --sd-config"),
        # the prompt's images are read before the model loads: a wrong count or a file that is not an image
        (["encode", "--prompt", "a <i>", "--image", tmp_path / "nope.png", "--out", tmp_path / "o.safetensors"],
         f"Image file {tmp_path / 'nope.png'} does not exist"),
        (["encode", "--prompt", "a <i>", "--image", a_file, "--out", tmp_path / "o.safetensors"],
         f"Cannot read image file {a_file}"),
        (["encode", "--prompt", "<i> and <i>", "--image", a_file, "--out", tmp_path / "o.safetensors"],
         "The prompt has 2 <i> placeholder(s) but 1 image(s) were given"),
        (["generate", "--sd-model", nano_sd, "--prompt", "a <i>", "--image", tmp_path / "nope.png"],
         f"Image file {tmp_path / 'nope.png'} does not exist"),
        (["generate", "--sd-model", nano_sd, "--prompt", "a photo", "--image", a_file],
         "The prompt has 0 <i> placeholder(s) but 1 image(s) were given"),
        (["generate", "--sd-model", nano_sd, "--prompt", "a photo", "--negative-prompt", "no <i>"],
         "The negative prompt contains <i>"),
        (["generate", "--sd-model", nano_sd, "--prompt", "a photo", "--negative-prompt", "bad \udcff"],
         "The negative prompt holds bytes that are not valid text"),  # an undecodable byte in argv
        (["generate", "--sd-model", a_file, "--prompt", "x", "--steps", "0"], "steps must be a whole number between 1 and 1000"),
        (["generate", "--sd-model", a_file, "--prompt", "x", "--height", "60"], "height must be a multiple of 8"),
        (["generate", "--sd-model", a_file, "--prompt", "x", "--width", "-64"], "width must be a whole number between 8 and 8192"),
        (["generate", "--sd-model", a_file, "--prompt", "x", "--num-images", "0"], "num_images must be"),
        (["generate", "--sd-model", a_file, "--prompt", "x", "--seed", str(2**64)], "seed must be"),
        (["generate", "--sd-model", a_file, "--prompt", "x", "--guidance-scale", "inf"], "guidance_scale must be a finite number"),
        (["encode", "--prompt", "<i>", "--image", a_file, "--image-weights", "1, 0.5", "--out", tmp_path / "o.safetensors"],
         "--image-weights has 2 value(s) but 1 image(s) were given; give one weight per image in --image order"),
        (["encode", "--prompt", "<i>", "--image", a_file, "--image-weights", "strong", "--out", tmp_path / "o.safetensors"],
         "--image-weights: 'strong' is not a number"),
        (["encode", "--prompt", "", "--image-weights", "1", "--out", tmp_path / "o.safetensors"],
         "--image-weights has 1 value(s) but 0 image(s) were given"),
        (["generate", "--sd-model", nano_sd, "--prompt", "a <i>", "--image", a_file, "--image-weights", "11"],
         "Image weight 11 (--image-weights) is outside 0..10"),
        (["generate", "--sd-model", nano_sd, "--prompt", "a <i>", "--image", a_file, "--image-weights", "1 1"],
         "--image-weights has 2 value(s) but 1 image(s) were given"),
        (["encode", "--prompt", "a <i:O.8>", "--image", a_file, "--out", tmp_path / "o.safetensors"],
         "Placeholder 1 of the prompt, '<i:O.8>', has no weight Kosmos-G can read"),
        (["generate", "--sd-model", nano_sd, "--prompt", "a <i:4>", "--image", a_file, "--image-weights", "3"],
         "Image weight 12 (image 1: 4 written in the text x 3 given as its weight) is outside 0..10"),
    ]
    for args, message in cases:
        result = run_cli(args[0], "--checkpoint", missing, *args[1:], check=False)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
    # found by a review: an empty path (an unset shell variable) was the current folder: `cache --clear` cleared it
    result = run_cli("cache", "--dir", "", "--clear", check=False)
    assert result.returncode == 2 and "argument --dir: an empty path; give a file or folder" in result.stderr
    result = run_cli("bench", "--size", "tiny", "--cases", "text_only", check=False)
    assert result.returncode == 2 and "unknown case(s) text_only" in result.stderr
    result = run_cli("bench", "--size", "tiny", "--repeats", "0", check=False)
    assert result.returncode == 2 and "--repeats must be at least 1" in result.stderr


def test_renamed_checkpoints_load_by_content(tmp_path, images):
    pt, _, _ = write_tiny_official(tmp_path / "official")
    converted = tmp_path / "official" / "converted.safetensors"
    run_cli("convert", "--checkpoint", pt, "--out", converted)
    expected = KosmosGPipeline.from_checkpoint(converted).encode("a <i>", images[:1])
    renamed_pt = pt.with_name("checkpoint_final.safetensors")  # a .pt under a .safetensors name
    pt.rename(renamed_pt)
    renamed_st = tmp_path / "official" / "converted.pt"  # and the other way round, upper case too
    converted.rename(renamed_st)
    for path in (renamed_pt, renamed_st):
        assert torch.equal(KosmosGPipeline.from_checkpoint(path).encode("a <i>", images[:1]), expected)


def test_convert_official_round_trip(tmp_path, images):
    pt, tok_dir, model = write_tiny_official(tmp_path / "official")
    out = tmp_path / "converted.safetensors"
    run_cli("convert", "--checkpoint", pt, "--out", out)
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any new file is (not safetensors' 0600)
    prompt = "a photo of <i> on the beach"
    from_pt = KosmosGPipeline.from_checkpoint(pt).encode(prompt, images[:1])
    from_st = KosmosGPipeline.from_checkpoint(out).encode(prompt, images[:1])  # tokenizer embedded
    assert torch.equal(from_pt, from_st)
    half = tmp_path / "converted-fp16.safetensors"
    run_cli("convert", "--checkpoint", pt, "--out", half, "--dtype", "float16")
    tensors = load_file(str(half))
    assert all(t.dtype == torch.float16 for k, t in tensors.items() if not k.startswith("tokenizer."))
    assert half.stat().st_size < out.stat().st_size
    info = run_cli("info", "--checkpoint", half).stdout
    assert '"float16"' in info and '"tokenizer_embedded": true' in info
    # a converted file converts again (here re-cast to bfloat16) with the tokenizer it carries, none beside it
    moved = tmp_path / "elsewhere" / "converted.safetensors"
    moved.parent.mkdir()
    out.rename(moved)
    recast = tmp_path / "converted-bf16.safetensors"
    run_cli("convert", "--checkpoint", moved, "--out", recast, "--dtype", "bfloat16")
    assert all(t.dtype == torch.bfloat16 for k, t in load_file(str(recast)).items() if not k.startswith("tokenizer."))
    from_recast = KosmosGPipeline.from_checkpoint(recast, dtype="float32").encode(prompt, images[:1])
    # the same weights rounded to bf16 here (unpacked: the CPU packs are copies of the weights)
    rounded = KosmosGPipeline.from_checkpoint(pt, dtype="float32", pack_cpu_linears=False)
    with torch.no_grad():
        for tensor in rounded.model.state_dict().values():
            tensor.copy_(tensor.to(torch.bfloat16))
    assert torch.allclose(from_recast, rounded.encode(prompt, images[:1]), atol=1e-5)
    assert not torch.allclose(from_recast, from_pt, atol=1e-5)  # the re-cast did change the weights


def test_encoding_needs_no_diffusers_and_the_nodes_requirements_leave_it_out(pack):
    """requirements.txt is what ComfyUI users install: it must not pull diffusers (whose recent releases
    upgrade huggingface-hub past transformers 4.x), so nothing the nodes run may import it."""
    requirements = (REPO / "requirements.txt").read_text().lower()
    assert not any(line.split("#")[0].strip().startswith(("diffusers", "huggingface")) for line in requirements.splitlines())
    code = ("import sys; sys.modules['diffusers'] = None; import kosmosg_core.cli; "
            "from kosmosg_core.pipeline import KosmosGPipeline; "
            f"print(tuple(KosmosGPipeline.from_checkpoint({str(pack[0])!r}).encode('a dog').shape))")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "(1, 77, 768)", result.stderr


def test_generate_without_diffusers_says_what_to_install(pack, tmp_path):
    """diffusers is not a requirement of the ComfyUI nodes (requirements.txt): generate names the file that has it."""
    from support.missing_package import env_without_package

    sd_model = tmp_path / "sd15.safetensors"
    sd_model.write_bytes(b"not read")
    env = env_without_package(tmp_path, "diffusers")
    result = subprocess.run([sys.executable, "-m", "kosmosg_core", "generate", "--checkpoint", str(pack[0]),
                             "--sd-model", str(sd_model), "--prompt", "a photo", "--out-dir", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "generate needs diffusers >= 0.35.2" in result.stderr and "requirements-train.txt" in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_with_diffusers_folder(pack, images, tmp_path):
    from support.tiny_sd15 import write_tiny_sd15

    write_tiny_sd15(tmp_path / "tiny-sd15")
    common = ["generate", "--checkpoint", pack[0], "--sd-model", tmp_path / "tiny-sd15", "--prompt", "a photo of <i>",
              "--image", images[0], "--steps", "3", "--height", "32", "--width", "32", "--seed", "7"]
    run_cli(*common, "--out-dir", tmp_path / "a")
    run_cli(*["6" if x == "7" else x for x in common], "--num-images", "2", "--out-dir", tmp_path / "b")
    a, b = Image.open(tmp_path / "a" / "kosmosg_7_0.png"), Image.open(tmp_path / "b" / "kosmosg_6_1.png")
    assert a.size == (32, 32)
    assert np.array_equal(np.asarray(a), np.asarray(b))  # image k of seed s is image 0 of seed s + k
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "b" / "kosmosg_6_0.png")), np.asarray(a))
    first = (tmp_path / "a" / "kosmosg_7_0.png").read_bytes()
    again = run_cli(*[("a red <i>" if x == "a photo of <i>" else x) for x in common], "--out-dir", tmp_path / "a")
    assert "kosmosg_7_0_1.png" in again.stdout  # a new name: the earlier result is kept
    assert (tmp_path / "a" / "kosmosg_7_0.png").read_bytes() == first
    result = run_cli(*[(pack[0] if str(x) == str(tmp_path / "tiny-sd15") else x) for x in common],
                     "--out-dir", tmp_path / "c", check=False)  # the Kosmos-G file given as the SD1.5 model
    assert result.returncode == 2 and "as a Stable Diffusion 1.5 model" in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr and len(error_lines) == 1 and "\n" not in error_lines[0]
    missing = [str(tmp_path / "missing") if str(x) == str(tmp_path / "tiny-sd15") else x for x in common]
    result = run_cli(*missing, "--out-dir", tmp_path / "c", check=False)
    assert result.returncode == 2 and "SD1.5 model not found" in result.stderr
    # --image-weights reach the encoder: 1 is the default, 0 removes the image's features
    run_cli(*common, "--image-weights", "1", "--out-dir", tmp_path / "w1")
    run_cli(*common, "--image-weights", "0", "--out-dir", tmp_path / "w0")
    assert (tmp_path / "w1" / "kosmosg_7_0.png").read_bytes() == first
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "w0" / "kosmosg_7_0.png")), np.asarray(a))


def test_sd_models_of_another_shape_are_refused_before_sampling(tmp_path):
    """diffusers loads an SD 2.x / SDXL U-Net (wider cross-attention) or an inpainting one (9 input channels) into
    the SD1.5 pipeline: sampling then stopped with a bare shape error."""
    from diffusers import UNet2DConditionModel

    from kosmosg_core.errors import CheckpointError
    from kosmosg_core.sd15 import load_sd15
    from support.tiny_sd15 import write_tiny_sd15

    sd2 = write_tiny_sd15(tmp_path / "sd2", context_dim=1024)
    with pytest.raises(CheckpointError, match="reads 1024-wide conditioning .* Kosmos-G makes SD1.5's 768"):
        load_sd15(sd2, torch.float32, torch.device("cpu"))
    inpainting = Path(write_tiny_sd15(tmp_path / "inpainting"))
    config = dict(UNet2DConditionModel.load_config(inpainting / "unet"), in_channels=9)
    UNet2DConditionModel.from_config(config).save_pretrained(inpainting / "unet")
    with pytest.raises(CheckpointError, match="takes 9 input channels .* 4-channel latents"):
        load_sd15(inpainting, torch.float32, torch.device("cpu"))


def test_generate_without_sd_model_needs_an_official_file_that_stores_them(pack):
    result = run_cli("generate", "--checkpoint", pack[0], "--prompt", "a photo", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "stores no SD1.5 U-Net or VAE" in result.stderr and "give an SD1.5 model (--sd-model" in result.stderr


def test_the_readme_python_example_runs(tmp_path):
    """The README's Python block, as written, from the repository root (it uses the shipped nano model)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(blocks) == 1, "the README has one Python example"
    script = tmp_path / "readme_example.py"
    script.write_text(blocks[0], encoding="utf-8")
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == ("torch.Size([1, 77, 768]) torch.Size([1, 77, 768]) "
                                                      "torch.Size([2, 77, 768])")


def test_the_readme_headless_commands_parse():
    """Every `python -m kosmosg_core ...` line of the README's headless block is a command the CLI takes (flags
    renamed or removed would leave the README wrong without a word)."""
    import shlex

    from kosmosg_core.cli import build_parser

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Headless: `python -m kosmosg_core`", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [" ".join(part.rstrip("\\ ") for part in command.splitlines())
                for command in re.split(r"\n(?=python -m kosmosg_core)", block.strip())]
    assert len(commands) >= 10 and all(c.startswith("python -m kosmosg_core ") for c in commands), commands
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in commands:
        argv = [a.strip("[]") for a in shlex.split(command.split("   #", 1)[0], comments=True)[3:]]  # [--x]: optional
        flags = set(subcommands[argv[0]]._option_string_actions)
        # exact names: argparse would also take the start of a renamed flag
        assert [a for a in argv if a.startswith("--") and a not in flags] == [], command
        parser.parse_args(argv)  # SystemExit (argparse's error) fails the test, naming the command


def test_sd_models_load_in_the_asked_dtype_without_diffusers_deprecation_warnings(tmp_path):
    """diffusers 0.40 renamed the loaders' `torch_dtype` to `dtype` and warned at every `generate`; releases before it
    (down to 0.35.2, the lower bound) know only `torch_dtype`."""
    import warnings

    from kosmosg_core.sd15 import diffusers_dtype_argument, load_sd15
    from support.tiny_sd15 import write_tiny_sd15

    folder = write_tiny_sd15(tmp_path / "sd15")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_sd15(folder, torch.bfloat16, torch.device("cpu"))
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not [m for m in deprecations if "dtype" in m or "steps_offset" in m], deprecations
    assert diffusers_dtype_argument(torch.float16, "0.35.2") == {"torch_dtype": torch.float16}
    assert diffusers_dtype_argument(torch.float16, "0.39.1") == {"torch_dtype": torch.float16}
    assert diffusers_dtype_argument(torch.float16, "0.40.0.dev0") == {"dtype": torch.float16}
    assert diffusers_dtype_argument(torch.float16, "1.2.0") == {"dtype": torch.float16}
    assert diffusers_dtype_argument(torch.float16, "0.40rc1") == {"dtype": torch.float16}
    assert diffusers_dtype_argument(torch.float16, "0.39.0+local") == {"torch_dtype": torch.float16}


def test_scheduler_settings_that_cannot_run_are_refused_before_sampling(pack, tmp_path):
    """diffusers failed on these only mid-sampling with a bare traceback, or gave black NaN images (DPM-Solver at
    1000 steps): each scheduler is now tried on the steps first."""
    import json

    from kosmosg_core.config import SD15_CONFIG_DIR
    from kosmosg_core.errors import GenerationSettingsError
    from kosmosg_core.generate import generate_images
    from kosmosg_core.sd15 import load_sd15
    from support.tiny_sd15 import write_tiny_sd15

    folder = Path(write_tiny_sd15(tmp_path / "sd15"))
    settings = folder / "scheduler" / "scheduler_config.json"
    shutil.copy(SD15_CONFIG_DIR / "scheduler" / "scheduler_config.json", settings)  # SD1.5's: 1000 training timesteps
    for scheduler in ("dpm", "ddim"):
        with pytest.raises(GenerationSettingsError, match=f"The {scheduler} scheduler cannot run 1000 steps: the "
                                                          r"model's noise schedule has 1000 timesteps .*use at most 999"):
            generate_images(pack[0], folder, "a photo", out_dir=tmp_path / "out", steps=1000, scheduler=scheduler,
                            height=16, width=16)
    assert not (tmp_path / "out").exists()
    from train.eval.generation import KosmosGSampler, SamplingSettings  # train.eval's sampler: the same check

    with pytest.raises(GenerationSettingsError, match="The ddim scheduler cannot run 1000 steps"):
        KosmosGSampler(str(pack[0]), str(folder), scheduler="ddim", device="cpu")(
            ["a photo"], [[]], SamplingSettings(steps=1000, guidance_scale=6.0, num_images=1, seed=0, height=16, width=16))
    load_sd15(folder, torch.float32, torch.device("cpu"), "pndm", steps=50)  # what runs still loads
    pristine = json.loads(settings.read_text())
    for key, value in (("algorithm_type", "foo"), ("timestep_spacing", "foo"), ("prediction_type", "foo")):
        settings.write_text(json.dumps(dict(pristine, **{key: value})))  # one damaged setting at a time
        with pytest.raises(GenerationSettingsError, match="foo .*or repair that file"):
            load_sd15(folder, torch.float32, torch.device("cpu"), "dpm", steps=2)


def test_convert_never_writes_over_its_source(pack, tmp_path):
    """`convert --checkpoint X.safetensors --out X.safetensors --dtype float16` rewrote X in place: the fp32
    original was lost."""
    source = tmp_path / "pack.safetensors"
    shutil.copy(pack[0], source)
    before = source.read_bytes()
    for overwrite in ([], ["--overwrite"]):
        result = run_cli("convert", "--checkpoint", source, "--out", source, "--dtype", "float16", *overwrite, check=False)
        assert result.returncode == 2 and "is the input file" in result.stderr, result.stderr
        assert source.read_bytes() == before
    # nor over another file unless asked (a review saw an SD1.5 model replaced), as the Convert node
    other = tmp_path / "sd15.safetensors"
    other.write_bytes(b"someone else's model")
    result = run_cli("convert", "--checkpoint", source, "--out", other, check=False)
    assert result.returncode == 2 and re.search(r"--out .*sd15\.safetensors already exists; add --overwrite to replace "
                                                r"it, or choose another name\.", result.stderr), result.stderr
    assert other.read_bytes() == b"someone else's model"
    run_cli("convert", "--checkpoint", source, "--out", other, "--overwrite")
    assert load_file(str(other)).keys() == load_file(str(source)).keys()


def test_nan_images_are_refused_not_written_black(pack, tmp_path):
    """diffusers turns NaN samples (damaged U-Net weights, fp16 overflow, a huge guidance scale) into black PNGs."""
    from diffusers import UNet2DConditionModel

    from kosmosg_core.errors import NonFiniteEncodingError
    from kosmosg_core.generate import generate_images
    from support.tiny_sd15 import write_tiny_sd15

    folder = Path(write_tiny_sd15(tmp_path / "sd15"))
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    with torch.no_grad():
        unet.conv_out.bias[0] = float("nan")
    unet.save_pretrained(folder / "unet")
    with pytest.raises(NonFiniteEncodingError, match=f"sampled from {folder} came out NaN .*: none was kept"):
        generate_images(pack[0], folder, "a photo", out_dir=tmp_path / "out", steps=2, height=16, width=16)
    assert not (tmp_path / "out").exists()
    from train.eval.generation import KosmosGSampler, SamplingSettings  # train.eval's sampler: the same check

    sampler = KosmosGSampler(str(pack[0]), str(folder), device="cpu")
    with pytest.raises(NonFiniteEncodingError, match="came out NaN"):
        sampler(["a photo"], [[]], SamplingSettings(steps=2, guidance_scale=6.0, num_images=1, seed=0, height=16,
                                                    width=16))


def test_a_checkpoint_name_that_is_not_utf8_is_written_escaped(tmp_path):
    """Found by a review: `encode` (and `convert`, after its long read) wrote the checkpoint's file name into the
    output's metadata, which must be UTF-8: a name with undecodable bytes (a Linux file name from another
    encoding) ended in a traceback after the work, and nothing was written. Now the name is written escaped."""
    pt, tok_dir, _ = write_tiny_official(tmp_path / "official")
    odd = os.path.join(os.fsencode(pt.parent), b"caf\xe9.pt")  # Latin-1 bytes
    os.rename(pt, odd)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out, converted = tmp_path / "cond.safetensors", tmp_path / "converted.safetensors"
    for args in ([b"encode", b"--checkpoint", odd, b"--tokenizer", os.fsencode(tok_dir), b"--prompt", b"a dog",
                  b"--out", os.fsencode(out)],
                 [b"convert", b"--checkpoint", odd, b"--tokenizer", os.fsencode(tok_dir), b"--out",
                  os.fsencode(converted)]):
        result = subprocess.run([sys.executable, "-m", "kosmosg_core", *args], capture_output=True, text=True, env=env,
                                cwd=REPO, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["checkpoint"] == "caf\\udce9.pt"
    with safe_open(str(converted), "pt") as f:
        assert f.metadata()["source"] == "caf\\udce9.pt"


def test_generate_like_tells_images_of_the_same_bytes_and_another_size_apart(monkeypatch, tmp_path, caplog):
    """Found by a review: the record's image digest hashed the pixels' bytes alone, so a 2x1 image and a 1x2 one of
    the same bytes passed as the recorded image. Records now keep each image's size too (older ones: digest only)."""
    import hashlib

    from kosmosg_core import cli, generate

    monkeypatch.setattr(generate, "generate_images", lambda **kwargs: [])
    pixels = np.arange(6, dtype=np.uint8).reshape(1, 2, 3)  # 2 wide, 1 high
    wide, tall = tmp_path / "wide.png", tmp_path / "tall.png"
    Image.fromarray(pixels).save(wide)
    Image.fromarray(pixels.reshape(2, 1, 3)).save(tall)
    digest = hashlib.sha256(pixels.tobytes()).hexdigest()
    common = dict(prompt="a <i>", images=["wide.png"], image_sha256=[digest], image_weights=[1.0],
                  effective_image_weights=[1.0])
    run = lambda png, image: cli.cmd_generate(cli.build_parser().parse_args(  # noqa: E731
        ["generate", "--like", str(png), "--checkpoint", "k.safetensors", "--sd-model", "s.safetensors", "--image",
         str(image)]))
    sized = _png_with_record(tmp_path / "sized.png", **common, image_sizes=[[2, 1]])
    for image, differs in ((wide, False), (tall, True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            run(sized, image)
        assert ("the pixels differ" in caplog.text) == differs, image
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run(_png_with_record(tmp_path / "older.png", **common), wide)  # a record from before image_sizes
    assert "the pixels differ" not in caplog.text
    with pytest.raises(Exception, match="image_sizes is"):
        run(_png_with_record(tmp_path / "bad.png", **common, image_sizes=[[2]]), wide)


def test_cache_clear_counts_what_it_removed_and_a_read_only_folder_is_an_error(tmp_path, monkeypatch, capsys):
    """Found by a review: --clear counted entries written meanwhile by another process as "could not be removed"
    (it compared two listings), and on a read-only file system removed nothing and exited 0."""
    import errno
    from pathlib import Path

    from kosmosg_core import cli
    from kosmosg_core.disk_cache import DiskCache
    from kosmosg_core.errors import OutputPathError

    cache = DiskCache(tmp_path / "cache")
    for k in range(3):
        cache.put(cache.key(k), torch.zeros(1000))
    (kept, _), *_ = cache.entries()
    real_unlink = Path.unlink

    def unlink(path, missing_ok=False):
        if path == kept:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        cache.put(cache.key("written meanwhile", str(path)), torch.zeros(10))  # another process writes on
        return real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    cli.cmd_cache(cli.build_parser().parse_args(["cache", "--dir", str(tmp_path / "cache"), "--clear"]))
    out = capsys.readouterr().out.strip()
    assert out.startswith("removed 2 entries") and out.endswith("; 1 could not be removed (Permission denied)"), out

    def read_only(path, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(OutputPathError, match=r"none of its \d+ entries could be removed \(Read-only file system\)"):
        cli.cmd_cache(cli.build_parser().parse_args(["cache", "--dir", str(tmp_path / "cache"), "--clear"]))


def test_like_warns_when_the_sd_config_folder_differs(tmp_path, caplog):
    """Found by a review: --sd-config (the SD1.5 configs a single file is built from: its scheduler settings) was
    not recorded, so --like with another one made another picture without a word."""
    from kosmosg_core.cli import _check_like_files
    from kosmosg_core.config import SD15_CONFIG_DIR
    from kosmosg_core.generate import settings_record

    made_with = shutil.copytree(SD15_CONFIG_DIR, tmp_path / "configs")
    record = settings_record(tmp_path / "missing.pt", None, "a dog", [], [], [], "", sd_config_dir=made_with)
    assert record["sd_config"] == "configs" and len(record["sd_config_fingerprint"]) == 16
    other = shutil.copytree(SD15_CONFIG_DIR, tmp_path / "other")
    (other / "scheduler" / "scheduler_config.json").write_text(
        (other / "scheduler" / "scheduler_config.json").read_text().replace("0.012", "0.02"))
    renamed = shutil.copytree(made_with, tmp_path / "renamed")

    def warnings(sd_config):
        caplog.clear()
        args = argparse.Namespace(like="x.png", checkpoint=None, sd_model=None, sd_config=sd_config, prompt="a cat",
                                  image=[])
        with caplog.at_level(logging.WARNING, logger="kosmosg_core.cli"):
            _check_like_files(args, {**record, "checkpoint": None, "checkpoint_fingerprint": None}, {})
        return caplog.text

    assert "--sd-config" not in warnings(str(renamed))  # a renamed copy: the same configs
    assert "was made with another --sd-config than other" in warnings(str(other))
    assert "was made with --sd-config configs, not (none)" in warnings(None)


def test_like_records_of_earlier_versions_and_device_auto(tmp_path, caplog):
    """Found by a review: a record with guidance below 1 (which earlier versions accepted) was called damaged even
    with --guidance-scale given; a record from before --sd-config was recorded warned that it was made without one;
    --device auto compared as the word "auto" with the recorded device (a noise warning where none was due)."""
    from kosmosg_core.cli import _check_like_files, _device_name
    from kosmosg_core.generate import settings_record, settings_record_problem

    record = settings_record(tmp_path / "missing.pt", None, "a dog", [], [], [], "", seed=0, noise="official",
                             num_images=1, steps=5, guidance_scale=0.5, scheduler="dpm", dtype="float32",
                             device="cpu", requested_width=None, requested_height=None)
    record.update(image_index=0, width=64, height=64)
    assert settings_record_problem(record) is None
    from kosmosg_core.generate import settings_like

    with caplog.at_level(logging.WARNING, logger="kosmosg_core.generate"):
        assert settings_like(record)["guidance_scale"] == 1.0  # as it was sampled: the picture made again
    assert "guidance_scale 0.5 was sampled as 1 (no guidance): made again with 1" in caplog.text
    caplog.clear()
    del record["sd_config"], record["sd_config_fingerprint"]
    args = argparse.Namespace(like="x.png", checkpoint=None, sd_model=None, sd_config=str(tmp_path), prompt="a cat",
                              image=[])
    with caplog.at_level(logging.WARNING, logger="kosmosg_core.cli"):
        _check_like_files(args, {**record, "checkpoint": None, "checkpoint_fingerprint": None}, {})
    assert "--sd-config" not in caplog.text
    assert _device_name("auto") == _device_name("AUTO") == ("cuda:0" if torch.cuda.is_available() else "cpu")
