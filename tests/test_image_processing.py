"""Image inputs -> PIL, and the official resize / crop / normalise, checked against torchvision."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Resize

from kosmosg_core.config import CLIP_MEAN, CLIP_STD
from kosmosg_core.errors import ImageError
from kosmosg_core.image_processing import check_pixel_values, preprocess_images, resize_and_center_crop, to_pil_images


def random_rgb(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def official_reference(image: Image.Image, size: int) -> np.ndarray:
    """The official APP transform: torchvision Resize + CenterCrop, then NumpyNormalize's arithmetic."""
    cropped = Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size)])(image)
    pixels = np.array(cropped).transpose(2, 0, 1)
    pixels = pixels / 255.0
    pixels -= np.array(CLIP_MEAN).reshape(-1, 1, 1)
    pixels /= np.array(CLIP_STD).reshape(-1, 1, 1)
    return pixels


# --- official transform --------------------------------------------------------------------------
@pytest.mark.parametrize("width, height", [(300, 199), (17, 500), (224, 224), (5, 7), (225, 224), (501, 223), (223, 501),
                                           (224, 1000)])
def test_matches_torchvision_official_transform(width, height):
    image = Image.fromarray(random_rgb(width, height, seed=width * 1000 + height))
    tv = Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224)])(image)
    ours = resize_and_center_crop(image, 224)
    assert ours.size == tv.size == (224, 224)
    assert np.array_equal(np.asarray(ours), np.asarray(tv))
    pixels = preprocess_images(image, 224)
    assert pixels.shape == (1, 3, 224, 224) and pixels.dtype == torch.float32
    expected = torch.from_numpy(official_reference(image, 224).astype(np.float32))
    assert torch.equal(pixels[0], expected)


def test_extreme_strip_is_resized_without_the_full_intermediate(monkeypatch):
    """A 2 x 200 strip at 224 px would be a 224 x 22400 intermediate; above the limit only the square is resized
    (close to the full resize, not bit-identical)."""
    from kosmosg_core import image_processing

    strip = Image.fromarray(random_rgb(2, 200, seed=3))
    exact = np.asarray(resize_and_center_crop(strip, 224)).astype(int)
    monkeypatch.setattr(image_processing, "MAX_RESIZED_PIXELS", 224 * 224 * 4)
    sizes = []
    original_resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: (sizes.append(size),
                                                                            original_resize(self, size, *a, **k))[1])
    cheap = np.asarray(resize_and_center_crop(strip, 224)).astype(int)
    assert sizes == [(224, 224)]  # no 224 x 22400 image was made
    assert cheap.shape == exact.shape and np.abs(cheap - exact).max() <= 8 and np.abs(cheap - exact).mean() < 1.0


@pytest.mark.parametrize("size", [32, 17])
def test_other_sizes_match_torchvision(size):
    image = Image.fromarray(random_rgb(61, 40, seed=size))
    assert torch.equal(preprocess_images(image, size)[0],
                       torch.from_numpy(official_reference(image, size).astype(np.float32)))


@pytest.mark.parametrize("width, left", [(301, 38), (303, 40)])
def test_crop_offset_uses_round_half_even(width, left):
    # height 224 -> no resize; (301 - 224) / 2 = 38.5 -> 38 and (303 - 224) / 2 = 39.5 -> 40 (Python's round,
    # as torchvision's CenterCrop): neither floor nor round-half-up gives both.
    pixels = random_rgb(width, 224, seed=3)
    ours = np.asarray(resize_and_center_crop(Image.fromarray(pixels), 224))
    assert np.array_equal(ours, pixels[:, left:left + 224])
    tv = np.asarray(CenterCrop(224)(Image.fromarray(pixels)))
    assert np.array_equal(ours, tv)


def test_normalisation_values():
    gray = np.full((224, 224, 3), 128, dtype=np.uint8)
    pixels = preprocess_images(gray)
    for c in range(3):
        value = (128 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]
        assert torch.allclose(pixels[0, c], torch.tensor(value, dtype=torch.float32))


def test_batch_of_several_images():
    images = [Image.fromarray(random_rgb(40 + i, 30, seed=i)) for i in range(3)]
    pixels = preprocess_images(images, 16)
    assert pixels.shape == (3, 3, 16, 16)
    for i, image in enumerate(images):
        assert torch.equal(pixels[i], preprocess_images(image, 16)[0])


# --- input kinds ---------------------------------------------------------------------------------
def test_pil_modes_converted_to_rgb():
    rgba = Image.fromarray(np.dstack([random_rgb(8, 6), np.full((6, 8), 7, np.uint8)]), mode="RGBA")
    gray = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8), mode="L")
    out = to_pil_images([rgba, gray])
    assert [im.mode for im in out] == ["RGB", "RGB"]
    assert np.array_equal(np.asarray(out[0]), np.asarray(rgba)[..., :3])  # alpha dropped, not composited
    assert np.array_equal(np.asarray(out[1])[..., 1], np.arange(48).reshape(6, 8))


def test_path_input(tmp_path):
    pixels = random_rgb(20, 12)
    path = tmp_path / "subject.png"
    Image.fromarray(pixels).save(path)
    for given in (path, str(path)):
        (image,) = to_pil_images(given)
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), pixels)


def test_path_applies_exif_orientation(tmp_path):
    pixels = random_rgb(20, 12)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    (loaded,) = to_pil_images(path)
    assert loaded.size == (12, 20)
    assert np.array_equal(np.asarray(loaded), np.rot90(pixels, k=-1))


def test_pil_image_gets_exif_orientation_like_a_path(tmp_path):
    pixels = random_rgb(20, 12)
    exif = Image.fromarray(pixels).getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    with Image.open(path) as opened:
        (from_pil,) = to_pil_images(opened)
    (from_path,) = to_pil_images(path)
    assert from_pil.size == from_path.size == (12, 20)
    assert np.array_equal(np.asarray(from_pil), np.asarray(from_path))


def test_high_bit_depth_and_float_modes_are_scaled_not_clipped(tmp_path):
    gray8 = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    expected = to_pil_images(Image.fromarray(gray8, mode="L"))[0]
    path16 = tmp_path / "gray16.png"
    Image.fromarray(gray8.astype(np.uint16) * 257).save(path16)  # a 16-bit PNG: PIL opens it as I;16 or I
    path_float = tmp_path / "float.tiff"
    Image.fromarray(gray8.astype(np.float32) / 255.0, mode="F").save(path_float)
    for path in (path16, path_float):
        (image,) = to_pil_images(path)
        assert np.array_equal(np.asarray(image), np.asarray(expected)), path.name
    (image,) = to_pil_images(Image.fromarray(gray8.astype(np.float32), mode="F"))  # F holding 0..255
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    (image,) = to_pil_images(Image.fromarray(gray8.astype(np.int32) * 257, mode="I"))
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_training_data_and_evaluation_read_images_as_inference_does(tmp_path):
    """train.data's decoder and train.eval's reader see a phone photo upright and a 16-bit PNG scaled, as the
    encoder does (they used `.convert("RGB")`: sideways subjects in built datasets, white 16-bit images)."""
    from train.data.crops import decode_image
    from train.eval.images import load_rgb

    pixels = random_rgb(20, 12)
    exif = Image.fromarray(pixels).getexif()
    exif[0x0112] = 6
    photo = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(photo, exif=exif, quality=95)
    deep = tmp_path / "gray16.png"
    Image.fromarray(np.arange(0, 256, dtype=np.uint16).reshape(16, 16) * 257).save(deep)
    for path in (photo, deep):
        (expected,) = to_pil_images(path)
        for image in (decode_image(path.read_bytes(), path.name), load_rgb(path)):
            assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(expected)), path.name


def test_premultiplied_gray_alpha_mode():
    (image,) = to_pil_images(Image.new("La", (4, 3), (90, 255)))
    assert image.mode == "RGB" and np.asarray(image)[0, 0].tolist() == [90, 90, 90]


def test_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (40, 40)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 pixels > 2 x 100: PIL refuses it as a bomb
    with pytest.raises(ImageError, match="huge.png is too large to read safely.*downscale it"):
        to_pil_images(path)


@pytest.mark.parametrize("name, content", [("missing.png", None), ("corrupt.png", b"\x89PNG\r\n\x1a\nnot really"),
                                           ("text.jpg", b"hello")])
def test_bad_paths_name_the_path(tmp_path, name, content):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError) as err:
        to_pil_images(str(path))
    assert str(path) in str(err.value)


def test_directory_path(tmp_path):
    with pytest.raises(ImageError, match="not a file"):
        to_pil_images(tmp_path)


def test_numpy_uint8_and_float():
    pixels = random_rgb(9, 7)
    (from_uint8,) = to_pil_images(pixels)
    assert np.array_equal(np.asarray(from_uint8), pixels)
    # ComfyUI loads uint8 / 255 in float32; rounding brings back the exact bytes
    (from_float,) = to_pil_images(pixels.astype(np.float32) / 255.0)
    assert np.array_equal(np.asarray(from_float), pixels)


def test_float_to_uint8_rounds_to_nearest():
    levels = np.arange(0, 255, dtype=np.float64)
    array = np.stack([(levels + 0.4) / 255.0, (levels + 0.6) / 255.0, levels / 255.0], axis=-1)[None]  # [1, 255, 3]
    (image,) = to_pil_images(array.astype(np.float32))
    got = np.asarray(image)[0].astype(int)
    assert got[:, 0].tolist() == levels.astype(int).tolist()
    assert got[:, 1].tolist() == (levels + 1).astype(int).tolist()
    assert got[:, 2].tolist() == levels.astype(int).tolist()


def test_numpy_gray_and_alpha_layouts():
    gray = random_rgb(9, 7)[..., 0]
    for array in (gray, gray[..., None], np.dstack([gray, np.zeros_like(gray)])):
        (image,) = to_pil_images(array)
        assert np.array_equal(np.asarray(image), np.repeat(gray[..., None], 3, axis=-1))
    rgba = np.dstack([random_rgb(9, 7), np.full((7, 9), 3, np.uint8)])
    (image,) = to_pil_images(rgba)
    assert np.array_equal(np.asarray(image), rgba[..., :3])


def test_comfy_image_tensor_batch():
    pixels = np.stack([random_rgb(10, 6, seed=s) for s in range(3)])  # [B, H, W, C] uint8
    batch = torch.from_numpy(pixels).float() / 255.0
    out = to_pil_images(batch)
    assert len(out) == 3
    for image, expected in zip(out, pixels):
        assert np.array_equal(np.asarray(image), expected)
    (single,) = to_pil_images(batch[1])  # [H, W, C]
    assert np.array_equal(np.asarray(single), pixels[1])
    (half,) = to_pil_images(batch[:1].to(torch.bfloat16))
    assert np.abs(np.asarray(half).astype(int) - pixels[0]).max() <= 2  # bf16 keeps ~3 significant digits
    assert preprocess_images(batch, 8).shape == (3, 3, 8, 8)


def test_list_of_mixed_inputs_flattens_in_order(tmp_path):
    a, b, c = (random_rgb(6, 5, seed=s) for s in range(3))
    path = tmp_path / "c.png"
    Image.fromarray(c).save(path)
    out = to_pil_images([Image.fromarray(a), torch.from_numpy(np.stack([b, b])).float() / 255.0, path])
    assert len(out) == 4
    assert [np.array_equal(np.asarray(im), ref) for im, ref in zip(out, [a, b, b, c])] == [True] * 4


def test_float_overshoot_is_clipped():
    array = np.full((4, 4, 3), 1.02, dtype=np.float32)
    array[0, 0] = -0.01
    (image,) = to_pil_images(array)
    assert np.asarray(image)[1, 1].tolist() == [255, 255, 255] and np.asarray(image)[0, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize("bad, fragment", [
    (torch.rand(1, 3, 8, 9), "channels-first"),
    (torch.rand(3, 8, 9), "channels-first"),
    (np.zeros((8, 9, 5), np.uint8), "5 channels"),
    (torch.rand(1, 8, 9, 5), "5 channels"),
    (np.zeros((0, 9, 3), np.uint8), "empty"),
    (torch.rand(0, 8, 8, 3), "empty"),
    (np.zeros((2, 2, 8, 9, 3)), "5 dimensions"),
    (np.full((4, 4, 3), 255.0), "must be 0..1"),
    (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
    (np.full((4, 4, 3), 300, np.int32), "0..255"),
    (np.zeros((4, 4, 3), np.complex64), "dtype"),
    ([], "empty list"),
    (None, "None"),
    (12, "int"),
    ([[Image.new("RGB", (4, 4))]], "nested"),
])
def test_bad_inputs_raise_image_error(bad, fragment):
    with pytest.raises(ImageError, match=fragment):
        to_pil_images(bad)


@pytest.mark.parametrize("bad, fragment", [
    (torch.full((2, 4, 4, 3), float("nan")), r"tensor of shape \(2, 4, 4, 3\) contains NaN or infinity; fix the step"),
    (torch.full((4, 4, 3), float("-inf")), "contains NaN or infinity"),
    (np.full((4, 4, 3), 255.0), r"holds values 255..255; float images must be 0..1 \(divide 0..255 images by 255"),
    # the limits (found by a mutation review: only 255 was tried): past 1.5 or below -0.5 is another scale
    (np.full((4, 4, 3), 1.6), r"holds values 1.6..1.6; float images must be 0..1"),
    (torch.full((4, 4, 3), -0.6), r"holds values -0.6..-0.6; float images must be 0..1"),
    (torch.full((1, 4, 4, 3), 300, dtype=torch.int64), "holds values 300..300; integer images must be 0..255"),
])
def test_pixel_values_are_checked_alone_with_the_message_preprocessing_gives(bad, fragment):
    """check_pixel_values: what front ends call per input to name it (the prompt node's sockets); the message is
    the core's own, naming the whole input's shape and the fix."""
    with pytest.raises(ImageError, match=fragment) as alone:
        check_pixel_values(bad)
    assert not str(alone.value).startswith("image")  # nothing node-specific: the node adds the socket name
    if bad.ndim == 3:  # a batch is split into its images before they are read
        with pytest.raises(ImageError) as preprocessing:
            preprocess_images(bad)
        assert str(preprocessing.value) == str(alone.value)


@pytest.mark.parametrize("good", [
    torch.rand(2, 4, 4, 3), torch.full((1, 4, 4, 3), 1.02).half(), np.zeros((4, 4, 3), np.uint8),
    np.ones((4, 4), bool), torch.full((4, 4, 3), 255, dtype=torch.int32),
])
def test_pixel_values_of_pictures_pass(good):
    check_pixel_values(good)


def test_pixel_check_of_an_empty_image_leaves_it_to_reading():
    """No values to check (numpy's min() of nothing was a bare ValueError): reading names it empty."""
    empty = torch.zeros(1, 0, 0, 3)
    check_pixel_values(empty)
    with pytest.raises(ImageError, match=r"shape \(0, 0, 3\) is empty; give at least one image with pixels"):  # batch split
        to_pil_images(empty)


def test_an_image_path_too_long_for_the_file_system_is_an_image_error(tmp_path):
    """exists() itself raised on it: a bare OSError ("File name too long")."""
    with pytest.raises(ImageError, match=r"^Image file .*: the name is longer than the file system allows \(304 bytes, "
                                         r"limit 255\); rename the file\.$"):
        preprocess_images([Image.new("RGB", (4, 4)), tmp_path / ("i" * 300 + ".png")])


def test_layout_errors_give_the_fix():
    with pytest.raises(ImageError) as err:
        to_pil_images(torch.rand(1, 3, 8, 9))
    assert "(1, 3, 8, 9)" in str(err.value) and "permute(0, 2, 3, 1)" in str(err.value)
    # found by a review: the advice named torch's permute for numpy arrays, and 4-D orders for 3-D inputs
    for given, advice in ((torch.rand(3, 8, 9), "x.permute(1, 2, 0)"), (np.zeros((3, 8, 9)), "x.transpose(1, 2, 0)"),
                          (np.zeros((1, 3, 8, 9)), "x.transpose(0, 2, 3, 1)")):
        with pytest.raises(ImageError, match=r"channels-first .*e\.g\. " + advice.replace("(", r"\(").replace(")", r"\)")):
            to_pil_images(given)


def test_comfy_mask_gets_a_hint():
    with pytest.raises(ImageError, match="MASK"):
        to_pil_images(torch.rand(1, 16, 16))


def test_ambiguous_layout_reads_as_comfy_channels_last():
    # [B, H, W, C] with H == 3 is a valid ComfyUI IMAGE (3 rows), not CHW
    batch = torch.rand(1, 3, 5, 3)
    (image,) = to_pil_images(batch)
    assert image.size == (5, 3)


def test_input_image_not_modified():
    image = Image.fromarray(random_rgb(30, 20))
    before = np.asarray(image).copy()
    (out,) = to_pil_images(image)
    out.paste((0, 0, 0), (0, 0, 30, 20))
    assert np.array_equal(np.asarray(image), before)


def test_a_bad_image_among_several_is_named_by_its_position(tmp_path):
    """One prompt's images (what the CLI reads before a model loads): a tensor's message names only its shape, so
    among several the bad one is named by its position, a batch counted as its images; a path names itself."""
    good, bad = torch.rand(8, 8, 3), torch.full((8, 8, 3), float("nan"))
    with pytest.raises(ImageError, match=r"^Image 2 of 3: Image tensor of shape \(8, 8, 3\) contains NaN"):
        to_pil_images([good, bad, good])
    with pytest.raises(ImageError, match=r"^Image 3 of 3: "):
        to_pil_images(torch.stack([good, good, bad]))
    with pytest.raises(ImageError, match=r"^Image 2 of 2: the PIL image is empty"):
        to_pil_images([good, Image.new("RGB", (0, 0))])
    with pytest.raises(ImageError, match=r"^Image tensor of shape \(8, 8, 3\) contains NaN"):  # alone: no position
        to_pil_images(bad)
    with pytest.raises(ImageError, match=r"^Image file .*missing.png does not exist"):
        to_pil_images([good, tmp_path / "missing.png"])


def test_damaged_exif_is_left_out_with_a_warning_as_the_demo_does(tmp_path, caplog):
    """Found by a review: EXIF PIL cannot apply (a tag of the wrong type: struct.error; a PNG text chunk named exif)
    was a bare traceback or "not an image" for pictures PIL reads. The official demo's gradio leaves it out."""
    image = Image.new("RGB", (24, 16), "red")
    exif = image.getexif()
    exif[0x0112], exif[0x0132] = 6, "2020:01:01 00:00:00"
    image.save(tmp_path / "bad_exif.jpg", exif=exif)
    data = (tmp_path / "bad_exif.jpg").read_bytes()
    # the DateTime tag's id -> SampleFormat's, its text value kept: PIL fails on it when transposing
    (tmp_path / "bad_exif.jpg").write_bytes(data.replace(b"\x01\x32\x00\x02", b"\x01\x53\x00\x02", 1))
    from PIL import PngImagePlugin

    text = PngImagePlugin.PngInfo()
    text.add_text("exif", "bogus")
    Image.new("RGB", (24, 16), "blue").save(tmp_path / "bogus_exif.png", pnginfo=text)
    for name, colour in (("bad_exif.jpg", (254, 0, 0)), ("bogus_exif.png", (0, 0, 255))):
        caplog.clear()
        with caplog.at_level("WARNING", logger="kosmosg_core.image_processing"):
            (loaded,) = to_pil_images(tmp_path / name)
        assert loaded.size == (24, 16) and np.abs(np.asarray(loaded)[8, 12].astype(int) - colour).max() <= 2, name
        assert "its EXIF cannot be read" in caplog.text and "using the image unrotated" in caplog.text, name


def test_float_mode_with_nan_or_inf_and_non_dense_tensors_are_refused():
    """Found by a review: a float (F) PIL image holding inf came out nearly black (inf became 3e38, so the picture
    was read as 0..255), NaN silently 0; a meta or sparse tensor was a bare NotImplementedError / TypeError."""
    for bad in (float("inf"), float("nan")):
        values = np.full((8, 8), 0.5, dtype=np.float32)
        values[2, 3] = bad
        with pytest.raises(ImageError, match=r"the PIL image \(mode F\) holds NaN or infinity"):
            to_pil_images(Image.fromarray(values, mode="F"))
    with pytest.raises(ImageError, match=r"is on the meta device \(a shape without pixel values\)"):
        to_pil_images(torch.rand(1, 8, 8, 3, device="meta"))
    with pytest.raises(ImageError, match=r"is a torch\.sparse_coo tensor; give an ordinary \(dense\) one"):
        to_pil_images(torch.rand(8, 8, 3).to_sparse())


def test_uint16_arrays_are_read_as_16_bit_files_are(tmp_path, caplog):
    """Found by a review: a uint16 array was read as 8-bit (257 times too bright) or refused, while the same
    picture as a 16-bit PNG was scaled: now both are scaled /257."""
    deep = (np.arange(0, 256, dtype=np.uint16).reshape(16, 16) * 257)
    Image.fromarray(deep).save(tmp_path / "gray16.png")
    (from_file,) = to_pil_images(tmp_path / "gray16.png")
    (from_array,) = to_pil_images(deep)
    assert np.array_equal(np.asarray(from_file), np.asarray(from_array))
    with caplog.at_level("WARNING", logger="kosmosg_core.image_processing"):
        (dark,) = to_pil_images(np.full((4, 4), 200, dtype=np.uint16))
    assert np.asarray(dark).max() == 1  # 200 / 257 rounds to 1, as in a 16-bit file; 8-bit data in uint16 is told
    assert "is uint16 (read as 16-bit: 0..65535) but holds only 0..255" in caplog.text and "astype(np.uint8)" in caplog.text


def test_an_unread_truncated_pil_image_is_reported_as_damaged(tmp_path):
    """A review found a lazily opened, truncated file passed as a PIL image warned that its EXIF cannot be read, then
    raised PIL's bare OSError."""
    Image.fromarray(random_rgb(64, 64)).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:300])
    with Image.open(tmp_path / "cut.png") as opened:
        with pytest.raises(ImageError, match=r"Cannot read the PIL image \(.*\); it is truncated or damaged"):
            to_pil_images(opened)


def test_an_animation_file_gives_its_first_frame_and_says_so(tmp_path, caplog):
    """Found by a review: a GIF's first frame was used without a word, where ComfyUI's Load Image makes a batch of
    all its frames (the CLI and the nodes then disagree on one file)."""
    from kosmosg_core.image_processing import to_pil_images

    frames = [Image.new("RGB", (8, 8), colour) for colour in ((0, 0, 255), (255, 0, 0))]
    path = tmp_path / "moving.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    with caplog.at_level("WARNING", logger="kosmosg_core.image_processing"):
        (image,) = to_pil_images([str(path)])
    assert image.getpixel((4, 4)) == (0, 0, 255)
    assert "moving.gif has 2 frames (an animation); its first frame is used" in caplog.text
    caplog.clear()
    frames[0].save(tmp_path / "still.png")
    to_pil_images([str(tmp_path / "still.png")])
    assert "frames" not in caplog.text


def test_a_camera_mpo_jpeg_is_no_animation(tmp_path, caplog):
    """Found by a review: phone and camera JPEGs are often MPO files (the photo + a preview frame): not warned."""
    from kosmosg_core.image_processing import to_pil_images

    photo, preview = Image.new("RGB", (16, 16), (0, 128, 0)), Image.new("RGB", (4, 4), (0, 0, 0))
    path = tmp_path / "phone.jpg"
    photo.save(path, format="MPO", save_all=True, append_images=[preview])
    assert Image.open(path).format == "MPO" and Image.open(path).n_frames == 2
    with caplog.at_level("WARNING", logger="kosmosg_core.image_processing"):
        (image,) = to_pil_images([str(path)])
    assert image.size == (16, 16) and "frames" not in caplog.text
