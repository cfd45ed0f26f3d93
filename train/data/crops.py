"""Images in and out: safe decoding, the official square crops, entity crops from a mask, PNG bytes.

Entity crop recipe (official OpenImages converter, spec section 8): threshold the CLIPSeg
probability map (> 0.3), dilate by size/100, keep the largest connected region, take the square
around it (shifted back inside the image), make a copy with everything outside the region white,
resize both to 512.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy.ndimage import find_objects, grey_dilation, label

RESAMPLE = Image.Resampling.BICUBIC


class CorruptImageError(ValueError):
    """The bytes are not a decodable image (counted as `skipped_corrupt`, never fatal)."""


def decode_image(data: bytes, name: str = "image") -> Image.Image:
    """Bytes -> fully loaded RGB image, read as inference reads images (EXIF orientation, 16-bit scaled:
    `kosmosg_core.image_processing.pil_to_rgb`). Any decoder failure becomes `CorruptImageError`."""
    from kosmosg_core.image_processing import pil_to_rgb

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return pil_to_rgb(image, name)
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, DecompressionBomb...)
        raise CorruptImageError(f"{name}: not a readable image ({type(error).__name__}: {error}); "
                                "re-download or remove the file") from error


def png_bytes(image: Image.Image) -> bytes:
    """Deterministic PNG encoding (no metadata, fixed compression level)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def center_square(image: Image.Image) -> Image.Image:
    """Largest centred square (official OpenImages loading step before captioning)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side at `size`, aspect kept."""
    if width <= height:
        return size, max(1, int(size / width * height))
    return max(1, int(size / height * width)), size


def resize_shorter_side(image: Image.Image, size: int | None) -> Image.Image:
    """Shorter side to `size`, aspect kept (official InstructPix2Pix repacking); None keeps it."""
    if not size:
        return image
    new = shorter_side_size(*image.size, size)
    return image if new == image.size else image.resize(new, RESAMPLE)


def resized_beyond_pixel_limit(image: Image.Image, size: int | None) -> bool:
    """Would `resize_shorter_side` make more pixels than `Image.MAX_IMAGE_PIXELS` (where PIL starts to warn of a
    decompression bomb; at twice it refuses)? A banner such as 10000x20 becomes 256000x512 at 512: GBs to build
    here, and flagged or refused as a bomb when training reads the sample back."""
    limit = Image.MAX_IMAGE_PIXELS
    if not size or not limit:
        return False
    width, height = shorter_side_size(*image.size, size)
    return width * height > limit


def largest_region(mask: np.ndarray, dilation: int) -> tuple[np.ndarray, tuple[slice, slice]] | None:
    """Dilate a boolean mask [H, W], keep its largest connected region.

    Returns (region mask [H, W] bool, bounding-box slices) or None when the mask is empty.
    Region size is measured the official way: mask pixels inside the region's bounding box.
    """
    if not mask.any():
        return None
    if dilation > 1:
        mask = grey_dilation(mask, size=(dilation, dilation))
    labels, _ = label(mask)
    boxes = find_objects(labels)
    sizes = [int(mask[box].sum()) for box in boxes]
    best = int(np.argmax(sizes))
    return labels == best + 1, boxes[best]


def square_box(box: tuple[slice, slice], height: int, width: int) -> tuple[int, int, int]:
    """Square (top, left, side) centred on `box`, moved back inside an [height, width] image."""
    y0, y1, x0, x1 = box[0].start, box[0].stop, box[1].start, box[1].stop
    side = min(max(y1 - y0, x1 - x0), height, width)
    top = (y0 + y1) // 2 - side // 2
    left = (x0 + x1) // 2 - side // 2
    top = min(max(top, 0), height - side)
    left = min(max(left, 0), width - side)
    return top, left, side


def entity_crops(image: Image.Image, probabilities: np.ndarray, threshold: float = 0.3,
                 dilation_divisor: int = 100, size: int = 512) -> tuple[Image.Image, Image.Image] | None:
    """(square crop, masked crop on white) for one entity, both `size` x `size`; None if the
    thresholded mask is empty. `probabilities` is [H, W] in 0..1 at the image's resolution."""
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    if probabilities.shape != (height, width):
        raise ValueError(f"mask shape {probabilities.shape} does not match image {(height, width)}")
    found = largest_region(probabilities > threshold, max(1, min(height, width) // dilation_divisor))
    if found is None:
        return None
    region, box = found
    top, left, side = square_box(box, height, width)
    crop = pixels[top:top + side, left:left + side]
    masked = crop.copy()
    masked[~region[top:top + side, left:left + side]] = 255
    return (Image.fromarray(crop).resize((size, size), RESAMPLE),
            Image.fromarray(masked).resize((size, size), RESAMPLE))
