"""Images in any common form -> the official Kosmos-G vision input [N, 3, S, S].

The official transform (APP `_build_image_transform()['gpt']`, spec section 3) is, per image:
PIL RGB -> torchvision `Resize(S, BICUBIC)` -> `CenterCrop(S)` -> `NumpyNormalize(CLIP_MEAN,
CLIP_STD)`. It is reimplemented here with PIL and numpy only (same arithmetic, bit for bit, tested
against torchvision), so the core does not need torchvision at import time.

Accepted inputs (`to_pil_images`), each giving RGB PIL images:
- a PIL image (any mode; converted with `.convert("RGB")`, which drops alpha like the official
  gradio demo's RGB conversion; 16-bit modes `I;16*` / `I` are scaled to 8 bits (/257: 0..65535 -> 0..255;
  `.convert` would clip them to white), float mode `F` is read as 0..1 when its values lie there, else 0..255);
  EXIF orientation applied (as ComfyUI's LoadImage, the gradio demo and image viewers do: PIL keeps a file's EXIF
  through convert / rotate, so a picture turned upright by hand should drop its orientation tag, as
  `ImageOps.exif_transpose` does); EXIF that cannot be applied (damaged) is left out with a warning, as gradio
  does;
- a path (str / os.PathLike) to an image file, read as above; a multi-frame file gives its first frame;
- a numpy array `[H, W]`, `[H, W, C]` or `[B, H, W, C]` with C = 1 (gray), 2 (gray + alpha),
  3 (RGB) or 4 (RGBA); uint8 0..255, uint16 0..65535 (scaled /257, as 16-bit files), other integer types holding
  0..255, or float 0..1;
  alpha is dropped (not composited), like `.convert("RGB")`;
- a torch tensor in ComfyUI's IMAGE layout `[B, H, W, C]` float 0..1 (also `[H, W, C]`, `[H, W]`),
  any dtype / device; a batch yields B images;
- a list / tuple of any of these, flattened in order.

Float images become uint8 with rounding (`round(x * 255)`, clipped), so an 8-bit picture loaded
by ComfyUI (`uint8 / 255` in float32) comes back to exactly its original bytes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import CLIP_MEAN, CLIP_STD, VisionConfig
from .errors import ImageError
from .files import check_input_path_length

logger = logging.getLogger(__name__)

_CHANNELS = {1: "gray", 2: "gray + alpha", 3: "RGB", 4: "RGBA"}  # channels last -> what they hold
IMAGE_CHANNELS = tuple(_CHANNELS)


def _layout_fix(kind: str, ndim: int) -> str:
    """How to put a channels-first tensor / array of `ndim` dimensions channels last, as a message's advice."""
    order = "1, 2, 0" if ndim == 3 else "0, 2, 3, 1"
    how = f"x.permute({order})" if kind == "tensor" else f"x.transpose({order})"
    return f"pass images as [H, W, C] / [B, H, W, C] with C = 3 (ComfyUI IMAGE layout), e.g. {how}"


# --- input normalisation -------------------------------------------------------------------------
def to_pil_images(images) -> list[Image.Image]:
    """Any supported image input (module docstring) -> list of RGB PIL images, in order. Where several are given
    (one prompt's), one that is no picture is named by its position, batches counted as their images ("Image 2
    of 3: ..."): a tensor's message names only its shape. Paths name themselves."""
    items = split_images(images)
    pictures = []
    for position, item in enumerate(items, 1):
        try:
            pictures.extend(_one_input_to_pil(item))
        except ImageError as error:
            if len(items) == 1 or isinstance(item, (str, os.PathLike)):
                raise
            raise ImageError(f"Image {position} of {len(items)}: {error}") from error
    return pictures


def split_images(images) -> list:
    """Any supported image input -> one entry per image, not decoded yet (cheap: callers count and check
    before any pixel is read). A batch [B, H, W, C] (tensor or array) gives its B [H, W, C] views."""
    if isinstance(images, (list, tuple)) and not images:
        raise ImageError("Got an empty list of images; give at least one image.")
    out = []
    for item in images if isinstance(images, (list, tuple)) else [images]:
        if isinstance(item, (list, tuple)):
            raise ImageError("Got a nested list of images; give a flat list (one entry per image or batch).")
        if item is None:
            raise ImageError("Got None instead of an image; connect an image or remove its placeholder.")
        if not isinstance(item, (Image.Image, str, os.PathLike, torch.Tensor, np.ndarray)):
            raise ImageError(f"Cannot read an image from a {type(item).__name__}; give a PIL image, a file path, a "
                             "numpy array or a ComfyUI IMAGE tensor.")
        if isinstance(item, (torch.Tensor, np.ndarray)) and item.ndim == 4 and item.shape[0] > 0 \
                and item.shape[-1] in _CHANNELS:  # (any other 4-D layout is reported whole when it is read)
            out.extend(item[b] for b in range(item.shape[0]))
        else:
            out.append(item)
    return out


def _one_input_to_pil(item) -> list[Image.Image]:
    if isinstance(item, Image.Image):
        return [pil_to_rgb(item, "the PIL image")]
    if isinstance(item, (str, os.PathLike)):
        return [_load_path(Path(item))]
    return _array_to_pil(_as_array(item), *_describe_array(item))


def _as_array(item) -> np.ndarray:
    """A tensor (any dtype / device; floats as float32) or a numpy array -> a numpy array."""
    if isinstance(item, torch.Tensor):
        if item.is_meta:  # a shape without values
            raise ImageError(f"Image tensor of shape {tuple(item.shape)} is on the meta device (a shape without pixel "
                             "values); give a tensor that holds the image.")
        if item.layout != torch.strided:
            raise ImageError(f"Image tensor of shape {tuple(item.shape)} is a {item.layout} tensor; give an "
                             "ordinary (dense) one, e.g. x.to_dense().")
        return item.detach().to("cpu", torch.float32).numpy() if item.is_floating_point() else item.detach().cpu().numpy()
    return item


def _describe_array(item) -> tuple[str, tuple]:
    """(kind, shape) of a tensor / array, as messages name it: ("tensor", (1, 40, 40, 3))."""
    return ("tensor" if isinstance(item, torch.Tensor) else "array"), tuple(item.shape)


def pil_to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Any PIL image -> an RGB copy as a viewer shows it (EXIF orientation, 16-bit / float modes scaled; module
    docstring). Also how train/ reads dataset and evaluation images, so they match inference."""
    if image.width < 1 or image.height < 1:
        raise ImageError(f"{name} is empty ({image.width}x{image.height}); give an image with pixels.")
    try:
        image.load()  # a lazily read file (Image.open) reads now: its damage is reported as such, not as EXIF's
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"Cannot read {name} ({e}); it is truncated or damaged. Re-save it as PNG or JPEG.") from e
    image = _upright(image, name)  # a copy: callers never alias the input
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # .convert("RGB") would clip these to 0..255: a 16-bit picture comes out white, a 0..1 float one black
        values = np.array(image, dtype=np.float32)  # one float32 copy: exact for 0..65535
        if not np.isfinite(values).all():
            raise ImageError(f"{name} (mode {image.mode}) holds NaN or infinity; fix the step that produced it.")
        if image.mode != "F":
            values /= 257.0  # 0..65535 -> 0..255
        elif values.max(initial=0.0) <= 1.0:
            values *= 255.0
        image = Image.fromarray(np.clip(np.round(values, out=values), 0, 255, out=values).astype(np.uint8), mode="L")
    elif image.mode == "La":  # premultiplied gray + alpha: PIL converts it to RGB only through LA
        image = image.convert("LA")
    return image.convert("RGB")


def _upright(image: Image.Image, name: str) -> Image.Image:
    """A copy of `image` as a viewer shows it: turned by its EXIF orientation. EXIF that cannot be applied is left
    out with a warning (gradio, which the official demo reads uploads with, does the same)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as e:  # damaged EXIF: PIL raises struct.error, TypeError, SyntaxError...
        logger.warning("%s: its EXIF cannot be read (%s: %s); using the image unrotated.", name, type(e).__name__, e)
        return image.copy()


def _load_path(path: Path) -> Image.Image:
    check_input_path_length(path, "Image file", ImageError)  # before exists(), which raises on it
    if not path.exists():
        raise ImageError(f"Image file {path} does not exist; check the path.")
    if not path.is_file():
        raise ImageError(f"{path} is not a file; give the path of an image file.")
    try:
        with Image.open(path) as opened:
            opened.load()
            frames = getattr(opened, "n_frames", 1)
            # an animation (ComfyUI's Load Image makes a batch of its frames; here one file is one image); not a
            # camera's MPO JPEG, whose second frame is a preview
            if getattr(opened, "is_animated", False) and opened.format != "MPO":
                logger.warning("%s has %d frames (an animation); its first frame is used (save the frame you want "
                               "as its own image to use another).", path, frames)
            return pil_to_rgb(opened, str(path))
    except Image.DecompressionBombError as e:
        raise ImageError(f"Image file {path} is too large to read safely ({e}); downscale it (subject images are "
                         "resized to the model's input size, 224 px for the official model, anyway).") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"Cannot read image file {path} ({e}); it is missing, truncated or not an image. "
                         f"Re-save it as PNG or JPEG.") from e


def _channels_error(kind: str, shape: tuple) -> ImageError:
    kinds = [f"{count} ({what})" for count, what in _CHANNELS.items()]
    return ImageError(f"Image {kind} of shape {shape} has {shape[-1]} channels; images need {', '.join(kinds[:-1])} or "
                      f"{kinds[-1]} channels last; {_layout_fix(kind, len(shape))}.")


def _array_to_pil(array: np.ndarray, kind: str, shape: tuple) -> list[Image.Image]:
    """[H, W] / [H, W, C] / [B, H, W, C] numeric array -> B RGB images."""
    if array.ndim == 2:
        array = array[None, :, :, None]
    elif array.ndim == 3:
        if array.shape[-1] not in _CHANNELS:
            if array.shape[0] in _CHANNELS:
                mask_hint = " (or it is a ComfyUI MASK [B, H, W]: convert it with 'Convert Mask to Image')" \
                    if array.shape[0] == 1 else ""
                raise ImageError(f"Image {kind} of shape {shape} looks channels-first [C, H, W]{mask_hint}; "
                                 f"{_layout_fix(kind, 3)}.")
            raise _channels_error(kind, shape)
        array = array[None]
    elif array.ndim == 4:
        if array.shape[-1] not in _CHANNELS:
            if array.shape[1] in _CHANNELS:
                raise ImageError(f"Image {kind} of shape {shape} looks channels-first [B, C, H, W]; "
                                 f"{_layout_fix(kind, 4)}.")
            raise _channels_error(kind, shape)
    else:
        raise ImageError(f"Image {kind} of shape {shape} has {array.ndim} dimensions; "
                         f"{_layout_fix(kind, 4)}.")
    if array.size == 0:
        raise ImageError(f"Image {kind} of shape {shape} is empty; give at least one image with pixels.")
    pixels = _to_uint8(array, kind, shape)  # [B, H, W, C]
    channels = pixels.shape[-1]
    if channels in (1, 2):  # gray (+ alpha): replicate gray into RGB, drop alpha
        pixels = np.repeat(pixels[..., :1], 3, axis=-1)
    elif channels == 4:
        pixels = pixels[..., :3]
    return [Image.fromarray(np.ascontiguousarray(frame)) for frame in pixels]


def check_pixel_values(image) -> None:
    """Refuse a tensor / numpy array whose values are no picture's (NaN / inf, floats far outside 0..1, integers
    outside 0..255), with the ImageError `preprocess_images` would raise. For front ends that check each input
    before encoding, to say which input it is (the ComfyUI prompt node prefixes its socket's name)."""
    _check_pixel_values(_as_array(image), *_describe_array(image))


def _check_pixel_values(array: np.ndarray, kind: str, shape: tuple) -> None:
    if array.size == 0:  # no values to check (min() would fail): reading refuses it as empty
        return
    if np.issubdtype(array.dtype, np.integer) and array.dtype not in (np.uint8, np.uint16):  # those: any value
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ImageError(f"Integer image {kind} of shape {shape} holds values {low}..{high}; integer images must "
                             f"be 0..255 (convert to uint8; 16-bit pictures as uint16) or give floats in 0..1.")
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError(f"Image {kind} of shape {shape} contains NaN or infinity; fix the step that produced it "
                             "(in ComfyUI, the node feeding this image).")
        low, high = float(array.min()), float(array.max())
        # Slight overshoot (e.g. from a sharpening upscaler) is clipped; 0..255 or -1..1 scales are mistakes.
        if high > 1.5 or low < -0.5:
            raise ImageError(f"Float image {kind} of shape {shape} holds values {low:.3g}..{high:.3g}; float images "
                             f"must be 0..1 (divide 0..255 images by 255, map -1..1 images with (x + 1) / 2).")


def _to_uint8(array: np.ndarray, kind: str, shape: tuple) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32, copy=False)
    _check_pixel_values(array, kind, shape)
    if array.dtype == np.uint16:  # 16-bit, as 16-bit files are read
        if array.max() <= 255:  # 8-bit values in a 16-bit type (e.g. from numpy arithmetic): nearly black as 16-bit
            logger.warning("Image %s of shape %s is uint16 (read as 16-bit: 0..65535) but holds only 0..255; if it "
                           "is 8-bit, convert it with .astype(np.uint8).", kind, shape)
        return np.rint(array / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
    raise ImageError(f"Image {kind} of shape {shape} has dtype {array.dtype}; give uint8 0..255 or float 0..1.")


# --- official transform --------------------------------------------------------------------------
MAX_RESIZED_PIXELS = 4096 * 4096  # ~50 MB of RGB: beyond it only the kept square is resized
def resize_and_center_crop(image: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    """torchvision `Resize(size, resample)` + `CenterCrop(size)` on a PIL image, same pixels (the vision
    tower's: bicubic; training's diffusion target: bilinear).

    Resize: shorter side -> size, longer side -> int(size * long / short) (torchvision's rounding
    down), PIL's `resample` (PIL always antialiases). Crop: top = int(round((h - size) / 2.0)), left
    likewise (Python's round: halves go to even). No padding is ever needed: after the resize
    both sides are >= size.

    An extreme strip (e.g. 1 x 5000 -> 224 x 1,120,000: GBs) is resized only over the kept square
    (`resize(box=...)`, the same scale and sample positions; not bit-identical: on random-noise strips the mean
    difference is under one level); every image up to `MAX_RESIZED_PIXELS` after the resize takes the exact path."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    top = int(round((new_height - size) / 2.0))
    left = int(round((new_width - size) / 2.0))
    if new_width * new_height > MAX_RESIZED_PIXELS:  # aspect ratio beyond ~300:1 at 224 px
        scale_x, scale_y = width / new_width, height / new_height  # source pixels per resized pixel
        box = (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)
        return image.resize((size, size), resample, box=box)
    if (new_width, new_height) != (width, height):  # torchvision returns the image untouched otherwise
        image = image.resize((new_width, new_height), resample)
    return image.crop((left, top, left + size, top + size))


def normalize(image: Image.Image) -> np.ndarray:
    """Official `NumpyNormalize`: uint8 HWC -> CHW, / 255, - CLIP_MEAN, / CLIP_STD (float64) -> [3, S, S]."""
    pixels = np.asarray(image).transpose(2, 0, 1) / 255.0
    pixels -= np.array(CLIP_MEAN).reshape(-1, 1, 1)
    pixels /= np.array(CLIP_STD).reshape(-1, 1, 1)
    return pixels


def preprocess_images(images, image_size: int = VisionConfig.image_size) -> torch.Tensor:
    """Images (anything `to_pil_images` reads) -> official vision input [N, 3, S, S] float32 (CPU);
    `image_size` = the model's `cfg.vision.image_size` (default: the official model's)."""
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}.")
    # one image decoded at a time: only its small crop is kept (a list of full-size photos could take GBs)
    batch = np.stack([normalize(resize_and_center_crop(image, image_size))
                      for item in split_images(images) for image in _one_input_to_pil(item)])
    return torch.from_numpy(batch.astype(np.float32))
