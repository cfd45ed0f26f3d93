"""Train the nano SD1.5 U-Net (narrow NanoUNet, zero-pads exactly to ComfyUI's 320-wide U-Net).

    python -m train.nano.train_unet --config train/configs/nano/unet.yaml

SD1.5's recipe: DDPM scaled-linear betas 0.00085 -> 0.012 over 1000 steps, epsilon prediction, on
U-Net-space latents (``0.18215 * latent`` of the trained TAESD, ``train.nano.taesd``), conditioned on
the frozen nano text encoder's ``last_hidden_state`` [B, 77, 768]; ``--uncond-prob`` of captions
are replaced by the empty caption "" so classifier-free guidance works. AdamW + EMA of the weights.

Latents and text embeddings are computed once and cached in ``--output-dir/cache.safetensors``.
Every ``--eval-every`` steps (or ``--eval-every-minutes``) the EMA weights sample held-out captions
with ``train.nano.sampler`` and ``train.nano.judge`` scores them: ``eval_single`` /
``eval_two`` (fraction of images with every attribute of every subject right) go into
``metrics.jsonl``. At the end ``unet_ema.safetensors`` (narrow EMA weights + config) is written;
``train.nano.export_nano`` turns it into the ComfyUI checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from kosmosg_core.files import save_safetensors
from train.common.checkpointing import save_checkpoint
from train.common.config import config_to_dict, run_entry_point
from train.nano import nano_data, paths, run_utils, sampler
from train.nano import text_encoder as te
from train.nano.train_vae import load_vae, vae_file
from train.nano.unet import NanoUNet, NanoUNetConfig

logger = logging.getLogger(__name__)

CACHE_FILE = "cache.safetensors"
TEXT_ENCODER_KEY = "text_encoder_fingerprint"  # metadata of the cache and the EMA file (te.weights_fingerprint)
VAE_KEY = "vae_fingerprint"  # metadata of the cache (files.content_fingerprint of --vae)
EMA_FILE = "unet_ema.safetensors"
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class UNetTrainConfig:
    output_dir: str = field(default=paths.UNET_RUN, metadata={"help": "run folder (resumes from it)"})
    text_encoder: str = field(default=paths.TEXT_ENCODER,
                              metadata={"help": "CLIPTextModel + tokenizer folder (train_text_encoder's output)"})
    vae: str = field(default=paths.VAE_RUN, metadata={"help": "vae.safetensors or the train_vae run folder"})
    num_scenes: int = field(default=4000, metadata={"min": 1, "help": "training scenes (latents + embeddings cached once)"})
    seed: int = field(default=0, metadata={"help": "seeds init and every draw (batches, noise, timesteps, drops)"})
    real_channels: int = field(default=64, metadata={"help": "NanoUNet width (multiple of 8; padded to 320)"})
    batch_size: int = field(default=32, metadata={"min": 1, "help": "latents per step"})
    max_steps: int = field(default=4000, metadata={"min": 1, "help": "optimiser steps"})
    learning_rate: float = field(default=5e-4, metadata={"help": "peak AdamW learning rate"})
    warmup_steps: int = field(default=100, metadata={"min": 0, "help": "linear warm-up steps"})
    lr_schedule: str = field(default="constant", metadata={"help": "constant | cosine (to a tenth at max_steps)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    clip_norm: float = field(default=1.0, metadata={"help": "gradient clipping max norm (0 = off)"})
    uncond_prob: float = field(default=0.1, metadata={"min": 0, "max": 1, "help": "fraction of captions replaced by the empty caption"})
    ema_decay: float = field(default=0.999, metadata={"min": 0, "max": 1, "help": "EMA decay (warmed up as min(decay, (1+s)/(10+s)))"})
    save_every: int = field(default=200, metadata={"min": 1, "help": "checkpoint every N steps (and at the end)"})
    eval_every: int = field(default=0, metadata={"help": "judged sample evaluation every N steps (0 = off)"})
    eval_every_minutes: float = field(default=0.0, metadata={"help": "... or every M minutes of wall time (0 = off)"})
    eval_samples: int = field(default=64, metadata={"help": "held-out captions per evaluation (half one-subject)"})
    eval_steps: int = field(default=20, metadata={"help": "sampler steps in evaluations"})
    eval_guidance: float = field(default=5.0, metadata={"help": "CFG scale in evaluations"})
    eval_method: str = field(default="ddim", metadata={"help": "sampler in evaluations: ddim | euler"})
    num_threads: int = field(default=1, metadata={"help": "torch threads (resume needs the same count)"})


# ----------------------------------------------------------------------------- data


@torch.no_grad()
def build_cache(cfg: UNetTrainConfig, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(cache, text-encoder fingerprint). Cache: latents [N, 4, 8, 8] (U-Net space), caption_index [N],
    embeddings [U, 77, 768] fp16 (unique captions), empty [1, 77, 768]; written once (atomically),
    reused on resume with the same text encoder only."""
    from safetensors import safe_open

    from kosmosg_core.files import content_fingerprint

    text_model, tokenizer = te.load_text_encoder(cfg.text_encoder)
    fingerprint = te.weights_fingerprint(text_model)
    vae_fingerprint = content_fingerprint(vae_file(cfg.vae)) or ""  # the latents are the VAE's
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            cache = {name: f.get_tensor(name) for name in f.keys()}
            cached_fingerprint = (f.metadata() or {}).get(TEXT_ENCODER_KEY, fingerprint)  # older caches: unrecorded
            cached_vae = (f.metadata() or {}).get(VAE_KEY, vae_fingerprint)
        if cache["latents"].shape[0] != cfg.num_scenes:
            raise ValueError(f"{path} holds {cache['latents'].shape[0]} scenes but --num-scenes is {cfg.num_scenes}; "
                             f"delete the cache or use the run's original config")
        if cached_fingerprint != fingerprint:
            raise ValueError(f"{path} was made with another text encoder than --text-encoder {cfg.text_encoder} "
                             f"(fingerprint {cached_fingerprint} vs {fingerprint}): resume with the run's text "
                             f"encoder, or start a new --output-dir")
        if cached_vae != vae_fingerprint:  # e.g. a new run into a folder whose checkpoint was deleted
            raise ValueError(f"{path} holds latents of another VAE than --vae {cfg.vae} (its content differs): delete "
                             "the cache to encode them again, or use the run's VAE")
        return cache, fingerprint
    vae = load_vae(cfg.vae)
    scenes = nano_data.load_scenes("train", cfg.num_scenes)
    latents = torch.cat([vae.encode_to_unet_space(nano_data.to_unit(scenes.images[i:i + 128]))
                         for i in range(0, len(scenes), 128)])
    unique = list(dict.fromkeys(scenes.captions))
    index = {c: i for i, c in enumerate(unique)}
    cache = {
        "latents": latents.contiguous(),
        "caption_index": torch.tensor([index[c] for c in scenes.captions]),
        "embeddings": te.encode_captions(text_model, tokenizer, unique).half().contiguous(),
        "empty": te.encode_captions(text_model, tokenizer, [""]).contiguous(),
    }
    save_safetensors(cache, path, {TEXT_ENCODER_KEY: fingerprint, VAE_KEY: vae_fingerprint})
    logger.info("cached %d latents (std %.3f) and %d caption embeddings", len(latents), latents.std(), len(unique))
    return cache, fingerprint


# ----------------------------------------------------------------------------- evaluation


class Evaluator:
    """Samples held-out captions (fixed set, fixed seed) and scores them with the judge."""

    def __init__(self, cfg: UNetTrainConfig, empty: torch.Tensor):
        from train.nano import judge

        self.cfg, self.judge, self.empty = cfg, judge, empty
        text_model, tokenizer = te.load_text_encoder(cfg.text_encoder)
        self.vae = load_vae(cfg.vae)
        half = max(1, cfg.eval_samples // 2)
        self.groups, self.ceiling = {}, {}
        for name, subjects in (("single", 1), ("two", 2)):
            scenes = nano_data.load_scenes("heldout", half, num_subjects=subjects)
            self.groups[name] = (scenes.specs, te.encode_captions(text_model, tokenizer, scenes.captions))
            # the VAE's ceiling: judged accuracy of decode(encode(real held-out image))
            with torch.no_grad():
                recon = self.vae.decode_from_unet_space(self.vae.encode_to_unet_space(nano_data.to_unit(scenes.images)))
            self.ceiling[f"vae_ceiling_{name}"] = self._fraction_correct(recon, scenes.specs)

    def _fraction_correct(self, images01: torch.Tensor, specs) -> float:
        images = images01.permute(0, 2, 3, 1).numpy()
        return sum(self.judge.score_against(img, spec.subjects)["all_correct"] for img, spec in zip(images, specs)) / len(specs)

    @torch.no_grad()
    def __call__(self, unet: NanoUNet) -> dict:
        cfg, out = self.cfg, {}
        unet.eval()
        for name, (specs, context) in self.groups.items():
            latents = sampler.sample(unet, context, self.empty, steps=cfg.eval_steps, guidance=cfg.eval_guidance,
                                     seed=cfg.seed + 12345, method=cfg.eval_method)
            images = self.vae.decode_from_unet_space(latents).permute(0, 2, 3, 1).numpy()  # [B, 64, 64, 3] 0-1
            scores = [self.judge.score_against(img, spec.subjects) for img, spec in zip(images, specs)]
            out[f"eval_{name}"] = sum(s["all_correct"] for s in scores) / len(scores)
            for attr in ("count", "colour", "shape", "position"):
                out[f"eval_{name}_{attr}"] = sum(s[attr] for s in scores) / len(scores)
        unet.train()
        return out


# ----------------------------------------------------------------------------- training


class TrainState(torch.nn.Module):
    """The U-Net and its EMA in one module, so the checkpoint's model state holds both."""

    def __init__(self, unet: NanoUNet):
        super().__init__()
        self.unet = unet
        self.ema = NanoUNet(unet.config)
        self.ema.load_state_dict(unet.state_dict())
        self.ema.requires_grad_(False)


def diffusion_loss(unet: NanoUNet, latents: torch.Tensor, context: torch.Tensor, g: torch.Generator,
                   alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Epsilon-prediction MSE at uniformly drawn timesteps (SD1.5 training objective)."""
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, sampler.NUM_TRAIN_TIMESTEPS, (latents.shape[0],), generator=g)
    noisy = sampler.add_noise(latents, noise, timesteps, alphas_cumprod)
    return F.mse_loss(unet(noisy, timesteps, context), noise)


def save_ema(path: Path, ema: NanoUNet, extra_meta: dict | None = None) -> Path:
    meta = {"nano_unet_config": json.dumps(ema.config.to_dict()), **(extra_meta or {})}
    return save_safetensors({k: v.detach().contiguous() for k, v in ema.state_dict().items()}, path, meta)


def read_ema(path: str | Path) -> tuple[Path, dict]:
    """(the ``unet_ema.safetensors`` file, its metadata) from that file or the run folder holding it."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / EMA_FILE
    if not path.is_file():
        raise ValueError(f"no trained U-Net at {path}; run python -m train.nano.train_unet (or pass its output dir)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return path, f.metadata() or {}
    except Exception as e:  # SafetensorError: not a safetensors file
        raise ValueError(f"{path} is not a readable .safetensors file ({e}); give the unet_ema.safetensors of a "
                         "python -m train.nano.train_unet run (or its folder).") from e


def trained_text_encoder(path: str | Path) -> str | None:
    """The fingerprint of the text encoder a U-Net (``unet_ema.safetensors`` or its run folder) was
    trained on; None for files written before it was recorded."""
    return read_ema(path)[1].get(TEXT_ENCODER_KEY)


def load_unet(path: str | Path) -> NanoUNet:
    """A NanoUNet from ``unet_ema.safetensors`` (or the run folder holding it), eval mode."""
    path, meta = read_ema(path)
    if "nano_unet_config" not in meta:
        raise ValueError(f"{path} has no 'nano_unet_config' metadata; not written by train.nano.train_unet")
    unet = NanoUNet(NanoUNetConfig.from_dict(json.loads(meta["nano_unet_config"])))
    run_utils.load_state_file(unet, path, "a nano U-Net (unet_ema.safetensors)", "python -m train.nano.train_unet")
    return unet.eval()


def train(cfg: UNetTrainConfig) -> Path:
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"--lr-schedule {cfg.lr_schedule!r}: use one of {', '.join(LR_SCHEDULES)}.")
    run_utils.setup_threads(cfg.num_threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    state_module = TrainState(NanoUNet(NanoUNetConfig(real_channels=cfg.real_channels)))
    unet, ema = state_module.unet, state_module.ema
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    lr_factor = run_utils.warmup_cosine(cfg.warmup_steps, cfg.max_steps, constant=cfg.lr_schedule == "constant")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start, metrics = run_utils.open_run(out, state_module, optimizer, scheduler, cfg)

    cache, text_encoder_fingerprint = build_cache(cfg, out / CACHE_FILE)
    latents, caption_index = cache["latents"], cache["caption_index"]
    embeddings, empty = cache["embeddings"], cache["empty"]
    alphas_cumprod = sampler.sd15_alphas_cumprod().float()
    evaluator = Evaluator(cfg, empty) if (cfg.eval_every or cfg.eval_every_minutes) else None
    if evaluator is not None:
        logger.info("judged accuracy of VAE round trips (the ceiling): %s", evaluator.ceiling)
    last_eval = time.time()

    def save(step: int) -> None:
        save_checkpoint(out, model_state=state_module.state_dict(), optimizer=optimizer, scheduler=scheduler,
                        step=step, extra={"config": config_to_dict(cfg)})

    unet.train()
    bar = run_utils.progress(cfg.max_steps, start, "unet")
    for step in range(start + 1, cfg.max_steps + 1):
        g = run_utils.step_generator(cfg.seed, step)
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=g)
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.uncond_prob
        context = embeddings[caption_index[idx]].float()  # [B, 77, 768]
        context[drop] = empty[0]
        loss = diffusion_loss(unet, latents[idx], context, g, alphas_cumprod)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.clip_norm)
        optimizer.step()
        scheduler.step()
        run_utils.ema_update_into(ema, unet, min(cfg.ema_decay, (1 + step) / (10 + step)))
        record = {"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]}
        due_steps = cfg.eval_every and step % cfg.eval_every == 0
        due_time = cfg.eval_every_minutes and time.time() - last_eval >= 60 * cfg.eval_every_minutes
        if evaluator is not None and (due_steps or due_time or step == cfg.max_steps):
            t0 = time.time()
            record.update(evaluator(ema))
            record.update(evaluator.ceiling)
            record["eval_seconds"] = round(time.time() - t0, 1)
            last_eval = time.time()
            logger.info("step %d: %s", step, {k: v for k, v in record.items() if k.startswith("eval")})
        metrics.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            save(step)
            save_ema(out / EMA_FILE, ema, {"step": str(step), TEXT_ENCODER_KEY: text_encoder_fingerprint})
    bar.close()
    return save_ema(out / EMA_FILE, ema, {"step": str(cfg.max_steps), TEXT_ENCODER_KEY: text_encoder_fingerprint})


def main(argv=None) -> Path:
    return run_entry_point(UNetTrainConfig, run_utils.with_run_lock(train), argv, description=__doc__.split("\n")[0], as_script=__name__ == "__main__")


if __name__ == "__main__":
    main()
