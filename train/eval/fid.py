r"""COCO-style FID between a folder of generated images and a folder of real ones.

    python -m train.eval fid --generated coco_out/ --real coco/val2014/ --inception inception_v3_google-0cc3c7bd.pth
    python -m train.eval fid --real coco/val2014/ --inception ... --save-real-stats coco_val2014.npz   # once
    python -m train.eval fid --generated coco_out/ --real coco_val2014.npz --inception ...           # reuse

Every image: shorter side -> --resize, centre crop (the official COCO eval's 256 x 256), then the
feature network: torchvision inception_v3 weights (2048-d pool features; the file torchvision ships
as inception_v3_google-0cc3c7bd.pth, .pth or .safetensors; inputs resized to --image-size, scaled to
[-1, 1]) or a transformers image-model folder (its own processor; pooled output). The Fréchet
distance of the two feature Gaussians is computed in float64 (train/eval/metrics.py). Absolute
values depend on the feature network: torchvision's Inception weights differ from the TF-FID
Inception that published FIDs (and the official torchmetrics eval) use, so compare numbers from the
same --inception only.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .cli import parse_eval_config
from .images import list_images, load_rgb, resize_center_crop

logger = logging.getLogger(__name__)

DESCRIPTION = "FID between a folder of generated and a folder (or saved statistics) of real images"


@dataclass
class FidConfig:
    generated: str = field(default="", metadata={"help": "folder of generated images (searched recursively)"})
    real: str = field(default="", metadata={"help": "folder of real images, or an .npz written by --save-real-stats"})
    inception: str = field(default="", metadata={"help": "torchvision inception_v3 weights (.pth/.safetensors) or "
                                                         "a transformers image-model folder"})
    image_size: int = field(default=299, metadata={"min": 1, "help": "torchvision Inception input size"})
    resize: int = field(default=256, metadata={"min": 1, "help": "shorter side before the centre crop (official COCO: 256)"})
    crop: int = field(default=256, metadata={"min": 1, "help": "centre-crop size (official COCO: 256)"})
    max_images: int = field(default=0, metadata={"min": 0, "help": "use at most N images per side, sorted by name (0 = all)"})
    batch_size: int = field(default=32, metadata={"min": 1, "help": "images per feature batch"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available) | cpu | cuda | cuda:N"})
    save_real_stats: str = field(default="", metadata={"help": "write the real images' mean/covariance to this .npz"})
    output_json: str = field(default="", metadata={"help": "also write the result JSON here"})


def image_statistics(paths: list[Path], extractor, cfg: FidConfig) -> tuple[np.ndarray, np.ndarray]:
    """Image files -> feature (mean [D], covariance [D, D]); images are read one batch at a time."""
    from .metrics import gaussian_statistics

    chunks = []
    for start in range(0, len(paths), cfg.batch_size):
        images = [resize_center_crop(load_rgb(p), cfg.resize, cfg.crop) for p in paths[start:start + cfg.batch_size]]
        chunks.append(extractor(images).double().numpy())
    return gaussian_statistics(np.concatenate(chunks))


def _folder_paths(folder: str, flag: str, cfg: FidConfig) -> list[Path]:
    paths = list_images(folder, flag, recursive=True)
    return paths[:cfg.max_images] if cfg.max_images else paths


def load_stats(path: str, extractor_name: str, earlier_name: str = "") -> tuple[np.ndarray, np.ndarray, int]:
    """`extractor_name`: this run's network (by its weights' content) and preprocessing; `earlier_name`: the same as
    versions before wrote it (the network by its weights file's name), accepted for statistics they saved."""
    with np.load(path, allow_pickle=False) as stats:  # plain arrays only, nothing unpickled
        if "mu" not in stats or "sigma" not in stats:
            raise ValueError(f"--real {path}: not a statistics file from --save-real-stats (needs mu and sigma).")
        saved_with = str(stats["extractor"]) if "extractor" in stats else None
        if saved_with is None:  # statistics from another tool: its preprocessing cannot be checked
            logger.warning("--real %s does not say how it was computed: the FID is only meaningful with the same "
                           "feature network and preprocessing as %s", path, extractor_name)
        elif earlier_name and saved_with == earlier_name:
            logger.info("--real %s names its network by the weights file's name (an earlier version): this run's "
                        "weights file has that name", path)
        elif saved_with != extractor_name:
            raise ValueError(f"--real {path} was computed with {saved_with}, this run uses {extractor_name} (the network "
                             "named by its weights' content): an FID between features of another network or another "
                             "resize/crop means nothing. Compute the real statistics again with this run's settings "
                             "(--real FOLDER --save-real-stats FILE), or run with the network and settings they name.")
        return stats["mu"], stats["sigma"], int(stats["count"]) if "count" in stats else -1


def run(cfg: FidConfig) -> dict:
    from kosmosg_core.devices import resolve_device
    from kosmosg_core.files import atomic_output, content_fingerprint

    from .features import InceptionFeatures
    from .metrics import frechet_distance

    if not cfg.real:
        raise ValueError("--real is required: a folder of real images or an .npz from --save-real-stats.")
    if not cfg.generated and not cfg.save_real_stats:
        raise ValueError("--generated is required (or only --save-real-stats to precompute the real statistics).")
    if cfg.crop > cfg.resize:
        raise ValueError(f"--crop {cfg.crop} is larger than --resize {cfg.resize} (the shorter side after resizing); "
                         "the centre crop must fit inside it (official COCO: both 256).")
    extractor = InceptionFeatures(cfg.inception, resolve_device(cfg.device), cfg.batch_size, cfg.image_size)
    # the weights by content (a renamed copy is the same network, another file of the same name is not; a folder's
    # hidden files, e.g. a hub download's metadata, do not count)
    weights = content_fingerprint(cfg.inception) or Path(cfg.inception).name
    preprocessing = f"resize{cfg.resize}:crop{cfg.crop}:{cfg.image_size}"
    extractor_name = f"{extractor.kind}:{weights}:{preprocessing}"
    earlier_name = f"{extractor.kind}:{Path(cfg.inception).name}:{preprocessing}"  # how earlier versions wrote it
    result: dict = {"feature_extractor": extractor_name}
    if cfg.real.lower().endswith(".npz"):
        if not Path(cfg.real).is_file():
            raise ValueError(f"--real {cfg.real}: no such statistics file.")
        mu_real, sigma_real, result["num_real"] = load_stats(cfg.real, extractor_name, earlier_name)
    else:
        real_paths = _folder_paths(cfg.real, "--real", cfg)
        mu_real, sigma_real = image_statistics(real_paths, extractor, cfg)
        result["num_real"] = len(real_paths)
    if cfg.save_real_stats:
        stats_path = Path(cfg.save_real_stats)
        if stats_path.suffix.lower() != ".npz":  # as np.savez would name it: report the file that exists
            stats_path = stats_path.with_name(stats_path.name + ".npz")
        with atomic_output(stats_path) as tmp, open(tmp, "wb") as stats_file:  # a file: savez keeps the name
            np.savez(stats_file, mu=mu_real, sigma=sigma_real, count=result["num_real"],
                     extractor=np.array(extractor_name))
        result["saved_real_stats"] = str(stats_path)
    if cfg.generated:
        generated_paths = _folder_paths(cfg.generated, "--generated", cfg)
        mu_gen, sigma_gen = image_statistics(generated_paths, extractor, cfg)
        result["num_generated"] = len(generated_paths)
        result["fid"] = frechet_distance(mu_gen, sigma_gen, mu_real, sigma_real)
        if min(result["num_generated"], result["num_real"]) < mu_gen.size:
            logger.warning("FID from %d images with %d-d features: the covariance is rank-deficient and the value "
                           "is biased upward; use thousands of images (COCO: 30k)",
                           min(result["num_generated"], result["num_real"]), mu_gen.size)
    result["config"] = asdict(cfg)
    if cfg.output_json:
        from kosmosg_core.files import write_json

        write_json(cfg.output_json, result)
    return result


def main(argv=None) -> dict:
    return run(parse_eval_config(FidConfig, argv, "fid", __doc__))
