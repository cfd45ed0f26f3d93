"""Train the nano VAE: ComfyUI's TAESD architecture on world images (64x64 -> 4x8x8 latents).

    python -m train.nano.train_vae --config train/configs/nano/vae.yaml

Loss: MSE on pixels in [0, 1] plus ``--edge-weight`` x L1 between the images' horizontal and
vertical finite differences (keeps shape outlines sharp). After training, ``vae_scale`` /
``vae_shift`` are fitted so the U-Net's input ``0.18215 * latent`` has zero mean and unit variance
(``train.nano.taesd.fit_latent_scale_shift``).

Writes into ``--output-dir``: ``checkpoint.pt`` (resumable), ``metrics.jsonl`` (loss; held-out
PSNR every ``--eval-every`` steps) and at the end ``vae.safetensors`` (TinyAutoencoder state dict:
``taesd_encoder.*``, ``taesd_decoder.*``, ``vae_scale``, ``vae_shift``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from kosmosg_core.files import save_safetensors
from train.common.checkpointing import save_checkpoint
from train.common.config import config_to_dict, run_entry_point
from train.common.metrics import read_metrics
from train.nano import nano_data, paths, run_utils
from train.nano.taesd import TinyAutoencoder, fit_latent_scale_shift

logger = logging.getLogger(__name__)

VAE_FILE = "vae.safetensors"


@dataclass
class VaeTrainConfig:
    output_dir: str = field(default=paths.VAE_RUN, metadata={"help": "run folder (resumes from it)"})
    num_scenes: int = field(default=20000, metadata={"min": 1, "help": "training scenes from the world's train stream"})
    eval_scenes: int = field(default=256, metadata={"help": "held-out scenes for PSNR"})
    fit_scenes: int = field(default=2048, metadata={"help": "training scenes used to fit vae_scale / vae_shift"})
    seed: int = field(default=0, metadata={"help": "seeds init and every batch draw"})
    batch_size: int = field(default=16, metadata={"min": 1, "help": "images per step"})
    max_steps: int = field(default=300, metadata={"min": 1, "help": "optimiser steps"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak Adam learning rate (cosine decay to a tenth)"})
    warmup_steps: int = field(default=20, metadata={"min": 0, "help": "linear warm-up steps"})
    crop_size: int = field(default=32, metadata={"help": "train on random crops of this side (multiple of 8, on the "
                                                         "8-px latent grid; the network is convolutional): 32 "
                                                         "costs 1/4 of full 64x64 images"})
    subject_crop_prob: float = field(default=0.75, metadata={"min": 0, "max": 1, "help": "fraction of crops centred (on the 8-px grid) "
                                                                      "on a subject: subjects cover about a twentieth of a scene"})
    foreground_weight: float = field(default=4.0, metadata={"help": "extra MSE weight on subject pixels (pixels "
                                                                     "that differ from the background)"})
    edge_weight: float = field(default=0.1, metadata={"help": "weight of the L1 finite-difference (edge) term"})
    save_every: int = field(default=50, metadata={"min": 1, "help": "checkpoint every N steps (and at the end)"})
    eval_every: int = field(default=50, metadata={"help": "held-out PSNR every N steps (0 = end only)"})
    num_threads: int = field(default=1, metadata={"help": "torch threads (resume needs the same count)"})
    init_vae: str = field(default="", metadata={"help": "start from this trained vae.safetensors (or its run folder) "
                                                        "instead of a fresh init"})
    freeze_encoder: bool = field(default=False, metadata={
        "help": "train the decoder only (needs --init-vae): the latents, vae_scale and vae_shift stay exactly the "
                "init's, so a U-Net trained on them stays valid"})


def foreground_mask(images01: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] 1.0 where a pixel differs from the background (the top-left pixel: world subjects
    stay >= 2 px inside the image)."""
    return ((images01 - images01[..., :1, :1]).abs().amax(1, keepdim=True) > 0.02).float()


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, edge_weight: float,
                        weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted MSE + edge_weight * L1 of finite differences; recon / target [B, 3, H, W] in [0, 1],
    weight [B, 1, H, W] (None = uniform)."""
    squared = (recon - target) ** 2
    loss = squared.mean() if weight is None else (squared * weight).sum() / (weight.sum() * squared.shape[1])
    if edge_weight:
        for dim in (2, 3):
            loss = loss + edge_weight * F.l1_loss(torch.diff(recon, dim=dim), torch.diff(target, dim=dim))
    return loss


def random_crops(images: torch.Tensor, size: int, g: torch.Generator, centres: torch.Tensor | None = None,
                 centre_prob: float = 0.0) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, size, size] crops whose corners lie on the 8-px latent grid.

    With probability ``centre_prob`` a crop is placed around ``centres[b]`` (x, y in px: a subject),
    snapped to the grid; otherwise anywhere.
    """
    h, w = images.shape[-2:]
    if size % 8 or not 8 <= size <= min(h, w):
        raise ValueError(f"crop_size={size} must be a multiple of 8 in [8, {min(h, w)}]")
    ys = torch.randint(0, (h - size) // 8 + 1, (len(images),), generator=g) * 8
    xs = torch.randint(0, (w - size) // 8 + 1, (len(images),), generator=g) * 8
    use_centre = torch.rand(len(images), generator=g) < centre_prob
    if centres is not None:
        jitter = torch.randint(-4, 5, (len(images), 2), generator=g)
        cx = ((centres[:, 0] + jitter[:, 0] - size / 2) / 8).round().clamp(0, (w - size) // 8).long() * 8
        cy = ((centres[:, 1] + jitter[:, 1] - size / 2) / 8).round().clamp(0, (h - size) // 8).long() * 8
        xs, ys = torch.where(use_centre, cx, xs), torch.where(use_centre, cy, ys)
    if size == h == w:
        return images
    return torch.stack([im[:, y:y + size, x:x + size] for im, y, x in zip(images, ys.tolist(), xs.tolist())])


@torch.no_grad()
def heldout_psnr(vae: TinyAutoencoder, images01: torch.Tensor) -> float:
    """PSNR (dB) of decode(encode(x)) clamped to [0, 1], over the held-out images."""
    vae.eval()
    recon = vae.taesd_decoder(vae.taesd_encoder(images01)).clamp(0, 1)
    vae.train()
    mse = F.mse_loss(recon, images01).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def heldout_judged(vae: TinyAutoencoder, images01: torch.Tensor, specs) -> float:
    """Fraction of round trips the judge reads as their scene (every attribute of every subject):
    the ceiling of any generator decoded by this VAE."""
    from train.nano import judge

    vae.eval()
    recon = vae.taesd_decoder(vae.taesd_encoder(images01)).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    vae.train()
    return sum(judge.score_against(img, spec.subjects)["all_correct"] for img, spec in zip(recon, specs)) / len(specs)


@torch.no_grad()
def fit_scale_shift(vae: TinyAutoencoder, images_uint8: torch.Tensor, batch: int = 256) -> tuple[float, float]:
    vae.eval()
    raw = torch.cat([vae.taesd_encoder(nano_data.to_unit(images_uint8[i:i + batch]))
                     for i in range(0, len(images_uint8), batch)])
    scale, shift = fit_latent_scale_shift(raw)
    vae.set_scale_shift(scale, shift)
    return scale, shift


def train(cfg: VaeTrainConfig) -> Path:
    run_utils.setup_threads(cfg.num_threads)
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    if cfg.freeze_encoder and not cfg.init_vae:
        raise ValueError("--freeze-encoder needs --init-vae: a frozen random encoder would define the latents")
    vae = load_vae(cfg.init_vae).train() if cfg.init_vae else TinyAutoencoder()
    vae.taesd_encoder.requires_grad_(not cfg.freeze_encoder)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, run_utils.warmup_cosine(cfg.warmup_steps, cfg.max_steps))
    start, metrics = run_utils.open_run(out, vae, optimizer, scheduler, cfg)

    train_set = nano_data.load_scenes("train", cfg.num_scenes)
    train_images = train_set.images  # uint8 [N, 3, 64, 64]
    # (x, y) centre of each scene's subjects [N, 2, 2] (a one-subject scene repeats its subject)
    centres = torch.tensor([[(s.cx, s.cy) for s in (spec.subjects * 2)[:2]] for spec in train_set.specs],
                           dtype=torch.float32)
    eval_set = nano_data.load_scenes("heldout", cfg.eval_scenes)
    eval_images, eval_specs = nano_data.to_unit(eval_set.images), eval_set.specs

    vae.train()
    bar = run_utils.progress(cfg.max_steps, start, "vae")
    for step in range(start + 1, cfg.max_steps + 1):
        g = run_utils.step_generator(cfg.seed, step)
        idx = torch.randperm(len(train_images), generator=g)[: cfg.batch_size]
        which = torch.randint(0, 2, (len(idx),), generator=g)
        full = nano_data.to_unit(train_images[idx])
        stacked = torch.cat([full, foreground_mask(full)], dim=1)  # crop image and mask together
        stacked = random_crops(stacked, cfg.crop_size, g, centres[idx, which], cfg.subject_crop_prob)
        target, fg = stacked[:, :3], stacked[:, 3:]
        with torch.set_grad_enabled(not cfg.freeze_encoder):
            latents = vae.taesd_encoder(target)
        recon = vae.taesd_decoder(latents)
        loss = reconstruction_loss(recon, target, cfg.edge_weight, 1 + cfg.foreground_weight * fg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        record = {"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]}
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps:
            record["heldout_psnr"] = heldout_psnr(vae, eval_images)
            record["heldout_judged"] = heldout_judged(vae, eval_images, eval_specs)
        metrics.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            save_checkpoint(out, model_state=vae.state_dict(), optimizer=optimizer, scheduler=scheduler, step=step,
                            extra={"config": config_to_dict(cfg)})
    bar.close()

    if cfg.freeze_encoder:  # same encoder, same latents: keep the init's U-Net-space mapping exactly
        scale, shift = float(vae.vae_scale), float(vae.vae_shift)
    else:
        scale, shift = fit_scale_shift(vae, train_images[: cfg.fit_scenes])
    save_safetensors({k: v.detach().contiguous() for k, v in vae.state_dict().items()}, out / VAE_FILE)
    logger.info("saved %s (vae_scale %.4f, vae_shift %.4f)", out / VAE_FILE, scale, shift)
    # a rerun of a finished run has it; an extended run (a higher --max-steps) writes its own
    if not any("vae_scale" in record and record.get("step") == cfg.max_steps for record in read_metrics(out)):
        metrics.write({"step": cfg.max_steps, "vae_scale": scale, "vae_shift": shift})
    return out / VAE_FILE


def vae_file(path: str | Path) -> Path:
    """``vae.safetensors`` itself, or the one in a run folder."""
    path = Path(path)
    return path / VAE_FILE if path.is_dir() else path


def load_vae(path: str | Path) -> TinyAutoencoder:
    """A TinyAutoencoder from ``vae.safetensors`` (or a run folder holding it), eval mode."""
    path = vae_file(path)
    if not path.is_file():
        raise ValueError(f"no trained VAE at {path}; run python -m train.nano.train_vae (or pass its output dir)")
    vae = TinyAutoencoder()
    run_utils.load_state_file(vae, path, "a TAESD state dict (vae.safetensors)", "python -m train.nano.train_vae")
    return vae.eval()


def main(argv=None) -> Path:
    return run_entry_point(VaeTrainConfig, run_utils.with_run_lock(train), argv, description=__doc__.split("\n")[0], as_script=__name__ == "__main__")


if __name__ == "__main__":
    main()
