"""Reading image folders and the standard resize / centre-crop used by every metric."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from train.common.walk import IMAGE_SUFFIXES, files_under


def list_images(folder, flag: str, recursive: bool = False) -> list[Path]:
    """Sorted image files in `folder` (or its subfolders). `flag` names the option for errors."""
    folder = Path(folder)
    if not str(folder) or not folder.is_dir():
        raise ValueError(f"{flag} {str(folder)!r}: not a folder; give a folder of images.")
    if recursive:  # symlinked subfolders followed, as train.data does
        paths = [folder / relative for relative in files_under(folder, IMAGE_SUFFIXES)]
    else:
        paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{flag} {folder}: holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return paths


def load_rgb(path) -> Image.Image:
    """An image file -> RGB, read as inference reads images (EXIF orientation, 16-bit scaled)."""
    from kosmosg_core.image_processing import pil_to_rgb

    try:
        with Image.open(path) as image:
            image.load()
            return pil_to_rgb(image, str(path))
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"could not read image {path}: {e}; remove or replace the file.") from e


def resize_center_crop(image: Image.Image, resize: int, crop: int,
                       resample=Image.Resampling.BICUBIC) -> Image.Image:
    """Shorter side -> `resize` px, then the central `crop` x `crop` square."""
    width, height = image.size
    scale = resize / min(width, height)
    new_w, new_h = max(crop, round(width * scale)), max(crop, round(height * scale))
    image = image.resize((new_w, new_h), resample)
    left, top = (new_w - crop) // 2, (new_h - crop) // 2
    return image.crop((left, top, left + crop, top + crop))
