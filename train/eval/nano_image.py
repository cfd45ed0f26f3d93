r"""Text-to-image accuracy of the shipped nano SD1.5 model, judged on held-out world captions.

    python -m train.eval nano-image --samples 200 --seed 0 --json nano_image.json [--grid nano_image.png]

Reads the shipped layout written by ``python -m train.nano.export_nano``: ``--checkpoint``
(models/nano/nano-sd15.safetensors: zero-padded U-Net + TAESD VAE) and ``--text-encoder``
(models/nano/text-encoder/). Nothing is trained or downloaded here.

Captions: ``--samples N`` held-out captions (world.HELDOUT_SEED stream, held-out split only),
``N - N // 2`` with one subject and ``N // 2`` with two; ``--seed S`` picks scenes
``S * 1_000_000 ...`` of that stream for each subject count and seeds the sampler's initial noise,
so the same flags give the same JSON. Each caption is sampled with the project's sampler
(``train.nano.sampler``: DDIM or Euler, classifier-free guidance against the empty caption) and
decoded; ``train.nano.judge.score_against`` says whether every named attribute (count, colour,
shape, position) of every subject is right.

Output (JSON; a table goes to stderr):
  text_to_image_single / text_to_image_two   fraction of images judged all-correct, per subject count
  text_to_image                              the same over all N
  unconditional_baseline                     empty-caption samples (same noise) scored against the
                                             same captions: what the model gets right by chance
  judge_accuracy                             the judge on min(N, --judge-samples) real held-out
                                             scenes (all attributes right), its own error bar
  *_stderr                                   binomial standard error sqrt(p (1 - p) / n)
  *_count / *_colour / ...                   per-attribute fractions
  samples, seed, sampler settings, checkpoint paths (no timings: same flags -> same JSON)
``--grid OUT.png`` also writes one row per caption (the first ``--grid-rows``, half one-subject, half
two): the held-out scene the caption describes, the generation, the empty-caption sample.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kosmosg_core.files import write_json
from train.nano import paths

from .cli import parse_eval_config

logger = logging.getLogger(__name__)

DESCRIPTION = "text-to-image accuracy of the shipped nano model on held-out captions, judged (train/nano/judge.py)"
SCENE_STRIDE = 1_000_000  # held-out scene indices per --seed value, so different seeds draw different captions
ATTRIBUTES = ("count", "colour", "shape", "position")
HOW_TO_MAKE = ("the nano model is trained with python -m train.nano.train_text_encoder / train_vae / train_unet "
               "and exported with python -m train.nano.export_nano")


@dataclass
class NanoSamplingOptions:
    """Options both nano evaluations share (this one and ``train.eval nano``)."""

    samples: int = field(default=200, metadata={"min": 1, "help": "held-out cases (N - N//2 one-subject, N//2 two-subject)"})
    seed: int = field(default=0, metadata={"min": 0, "help": "picks the held-out cases and the initial noise"})
    steps: int = field(default=20, metadata={"min": 1, "help": "sampler steps"})
    guidance: float = field(default=5.0, metadata={"help": "classifier-free guidance scale"})
    method: str = field(default="ddim", metadata={"help": "sampler: ddim | euler"})
    batch_size: int = field(default=64, metadata={"min": 1, "help": "cases per sampler batch (each batch's noise is seeded from --seed and its number, so results depend on it; the JSON records it)"})
    num_threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    json: str = field(default="", metadata={"help": "also write the result JSON to this file"})
    grid: str = field(default="", metadata={"help": "also write a PNG grid of the first --grid-rows cases"})
    grid_rows: int = field(default=8, metadata={"min": 0, "help": "cases in the --grid PNG (half one-subject, half two)"})


@dataclass
class NanoImageConfig(NanoSamplingOptions):
    checkpoint: str = field(default=paths.SD15_CHECKPOINT,
                            metadata={"help": "nano SD1.5 single-file checkpoint (U-Net + TAESD), export_nano's output"})
    text_encoder: str = field(default=paths.SHIPPED_TEXT_ENCODER,
                              metadata={"help": "CLIPTextModel + tokenizer folder, export_nano's output"})
    judge_samples: int = field(default=200, metadata={"help": "real held-out scenes for judge_accuracy: min(N, this)"})


# ----------------------------------------------------------------------------- loading


def _require(path: str, flag: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{flag} {path}: {what} not found; {HOW_TO_MAKE} (or pass {flag} PATH)")
    return p


def load_shipped_model(checkpoint: str, text_encoder: str, checkpoint_flag: str = "--checkpoint"):
    """(NanoUNet, TinyAutoencoder, CLIPTextModel, tokenizer) from the shipped files, eval mode, float32.

    checkpoint_flag: the caller's flag for the nano SD1.5 file, named in the error when it is missing."""
    from train.nano import text_encoder as te
    from train.nano.sd15_format import load_networks

    ckpt_path = _require(checkpoint, checkpoint_flag, "nano SD1.5 checkpoint")
    text_path = _require(text_encoder, "--text-encoder", "nano text encoder folder")
    unet, vae = load_networks(ckpt_path, f"{checkpoint_flag} {checkpoint}")
    text_model, tokenizer = te.load_text_encoder(text_path)
    return unet, vae, text_model, tokenizer


# ----------------------------------------------------------------------------- captions + scoring


def heldout_specs(count: int, num_subjects: int | None, seed: int, offset: int = 0) -> list:
    """``count`` held-out scene specs with ``num_subjects`` subjects (None: as the world draws them),
    scenes seed * SCENE_STRIDE + offset onwards."""
    from train.nano import world

    start = int(seed) * SCENE_STRIDE + int(offset)
    return [world.spec_at(world.HELDOUT_SEED, start + i, num_subjects) for i in range(count)]


def binomial_stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n > 0 else float("nan")


def score_fractions(scores: list[dict], prefix: str) -> dict:
    """``prefix`` (all_correct fraction), ``prefix_stderr`` and ``prefix_<attribute>`` over ``scores``."""
    n = len(scores)
    p = sum(bool(s["all_correct"]) for s in scores) / n
    out = {prefix: p, f"{prefix}_stderr": binomial_stderr(p, n)}
    for attr in ATTRIBUTES:
        out[f"{prefix}_{attr}"] = sum(bool(s[attr]) for s in scores) / n
    return out


@torch.no_grad()
def generate(unet, vae, context: torch.Tensor, uncond: torch.Tensor | None, cfg: NanoImageConfig,
             noise_seed: int) -> torch.Tensor:
    """context [N, 77, 768] -> images [N, 64, 64, 3] float in [0, 1]; batch b's noise seed is noise_seed + b.

    cfg: any config with the sampler fields ``steps``, ``guidance``, ``method`` and ``batch_size``."""
    from train.nano import sampler

    images = []
    for b, start in enumerate(range(0, context.shape[0], cfg.batch_size)):
        latents = sampler.sample(unet, context[start:start + cfg.batch_size], uncond, steps=cfg.steps,
                                 guidance=cfg.guidance, seed=noise_seed + b, method=cfg.method)
        images.append(vae.decode_from_unet_space(latents).permute(0, 2, 3, 1))  # [B, 64, 64, 3]
    return torch.cat(images).clamp(0, 1)


def validate_sampler(cfg) -> None:
    """Check the sampler fields ``steps``, ``batch_size`` and ``method`` of any config (see ``generate``)."""
    from train.nano import sampler

    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"--steps and --batch-size must be >= 1, got {cfg.steps} and {cfg.batch_size}")
    if cfg.method not in sampler.METHODS:
        raise ValueError(f"--method must be one of {sampler.METHODS}, got {cfg.method!r}")
    if cfg.grid and cfg.grid_rows < 1:
        raise ValueError(f"--grid-rows must be >= 1, got {cfg.grid_rows}")
    if cfg.grid and not cfg.grid.lower().endswith(".png"):
        raise ValueError(f"--grid {cfg.grid}: the grid is a PNG; name the file *.png")


def validate(cfg: NanoImageConfig) -> None:
    if cfg.samples < 2:
        raise ValueError(f"--samples must be >= 2 (half one-subject, half two-subject captions), got {cfg.samples}")
    validate_sampler(cfg)
    if cfg.judge_samples < 1:
        raise ValueError(f"--judge-samples must be >= 1, got {cfg.judge_samples}")


def run(cfg: NanoImageConfig) -> dict:
    from train.nano import judge, world
    from train.nano import text_encoder as te

    validate(cfg)
    torch.set_num_threads(max(1, cfg.num_threads))
    t0 = time.time()
    unet, vae, text_model, tokenizer = load_shipped_model(cfg.checkpoint, cfg.text_encoder)
    empty = te.encode_captions(text_model, tokenizer, [""])  # [1, 77, 768]

    groups = {"single": heldout_specs(cfg.samples - cfg.samples // 2, 1, cfg.seed),
              "two": heldout_specs(cfg.samples // 2, 2, cfg.seed)}
    result: dict = {}
    all_scores, all_baseline = [], []
    grid_rows = []
    for g, (name, specs) in enumerate(groups.items()):
        context = te.encode_captions(text_model, tokenizer, [world.caption_of(s) for s in specs])  # [n, 77, 768]
        # the noise seed depends on --seed and the group only, so the baseline sees the same noise
        noise_seed = int(cfg.seed) * 1_000 + 100 * g
        images = generate(unet, vae, context, empty, cfg, noise_seed).numpy()
        scores = [judge.score_against(img, spec.subjects) for img, spec in zip(images, specs)]
        # empty caption for both branches: guidance has nothing to amplify, so sample unguided
        uncond_images = generate(unet, vae, empty.expand(len(specs), -1, -1), None, cfg, noise_seed).numpy()
        baseline = [judge.score_against(img, spec.subjects) for img, spec in zip(uncond_images, specs)]
        result.update(score_fractions(scores, f"text_to_image_{name}"))
        result.update(score_fractions(baseline, f"unconditional_baseline_{name}"))
        result[f"samples_{name}"] = len(specs)
        if cfg.grid:  # the held-out scene its caption describes, the generation, the empty-caption sample
            grid_rows += [[world.render_scene(spec).image, as_uint8(img), as_uint8(unc)]
                          for spec, img, unc in zip(specs, images, uncond_images)][:grid_rows_for(name, cfg.grid_rows)]
        all_scores += scores
        all_baseline += baseline
    result.update(score_fractions(all_scores, "text_to_image"))
    result.update(score_fractions(all_baseline, "unconditional_baseline"))

    judge_n = min(cfg.samples, cfg.judge_samples)
    accuracy = judge.measure_judge_accuracy(judge_n, seed=world.HELDOUT_SEED)
    result["judge_accuracy"] = accuracy["all_correct"]
    result["judge_accuracy_stderr"] = binomial_stderr(accuracy["all_correct"], judge_n)
    result["judge_samples"] = judge_n
    result.update({
        "samples": cfg.samples, "seed": cfg.seed,
        "sampler": {"method": cfg.method, "steps": cfg.steps, "guidance": cfg.guidance, "batch_size": cfg.batch_size,
                    "uncond": "empty caption", "latent_shape": [4, 8, 8]},
        "checkpoint": str(cfg.checkpoint), "text_encoder": str(cfg.text_encoder),
    })  # no wall time in the result: the same flags give byte-identical JSON
    logger.info("nano-image: %d captions in %.1f s", cfg.samples, time.time() - t0)
    report(format_table(result), result, cfg.json)
    if cfg.grid:
        write_grid(cfg.grid, grid_rows)
        logger.info("nano-image: wrote the grid %s (%d rows)", cfg.grid, len(grid_rows))
    return result


def report(table: str, result: dict, json_path: str) -> None:
    """The table to stderr; the result to ``json_path`` if given (sorted keys: same flags, same bytes)."""
    print(table, file=sys.stderr)
    if json_path:
        write_json(json_path, result)


def format_table(result: dict) -> str:
    return metric_table(result, [
        ("text_to_image_single", "samples_single"), ("text_to_image_two", "samples_two"),
        ("text_to_image", "samples"), ("unconditional_baseline_single", "samples_single"),
        ("unconditional_baseline_two", "samples_two"), ("unconditional_baseline", "samples"),
        ("judge_accuracy", "judge_samples")])


def metric_table(result: dict, rows: list[tuple[str, str]]) -> str:
    """Rows (metric key, sample-count key) of value / stderr / n, then the sampler settings."""
    lines = [f"{'metric':<32}{'value':>8}{'stderr':>9}{'n':>6}"]
    for key, n_key in rows:
        lines.append(f"{key:<32}{result[key]:>8.3f}{result[key + '_stderr']:>9.3f}{result[n_key]:>6d}")
    s = result["sampler"]
    lines.append(f"(sampler {s['method']}, {s['steps']} steps, guidance {s['guidance']}; seed {result['seed']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- grid (both nano evals)

GRID_SCALE = 2  # grid cells are the 64-px images upscaled (nearest) by this
GRID_PAD = 4  # px between grid cells
GRID_CANVAS = 200  # grey level behind the cells (subject images are on white)


def grid_rows_for(group: str, grid_rows: int) -> int:
    """Rows of the grid for a subject-count group: the first half (rounded up) one-subject cases."""
    return (grid_rows + 1) // 2 if group == "single" else grid_rows // 2


def as_uint8(image: np.ndarray) -> np.ndarray:
    """float [64, 64, 3] in 0..1 -> uint8."""
    return np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)


def write_grid(path, rows: list[list]) -> Path:
    """A PNG of ``rows`` (lists of uint8 [64, 64, 3] cells or None), each cell upscaled GRID_SCALE x."""
    from PIL import Image

    from kosmosg_core.files import save_image

    cell = 64 * GRID_SCALE
    columns = max(len(r) for r in rows)
    width, height = GRID_PAD + columns * (cell + GRID_PAD), GRID_PAD + len(rows) * (cell + GRID_PAD)
    canvas = Image.new("RGB", (width, height), (GRID_CANVAS,) * 3)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            if image is not None:
                tile = Image.fromarray(image).resize((cell, cell), Image.Resampling.NEAREST)
                canvas.paste(tile, (GRID_PAD + c * (cell + GRID_PAD), GRID_PAD + r * (cell + GRID_PAD)))
    return save_image(canvas, path)


def main(argv=None) -> dict:
    return run(parse_eval_config(NanoImageConfig, argv, "nano-image", __doc__))
