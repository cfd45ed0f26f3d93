"""Stage 3: compositional instruction tuning through the frozen score model (official runtrain.sh).

Per sample (official loaders + diffusion wrapper, spec section 8):
- text: `text` or, with p = `drop_caption_prob`, `text_dropped` (entity words / IP2P input caption
  removed); entity images: square crop or masked crop with p = `masked_entity_prob`; IP2P: one of
  the seeds; target: Resize + CenterCrop to `resolution`, VAE-encoded (sampled) latents;
- condition = KosmosG(prompt) [77, C]; with p = `uncond_prob` replaced by the unconditional
  embedding aligner(MLLM([<s>])), recomputed with gradients every step;
- t ~ U{0..999}, eps ~ N(0, I); loss = mean over latent elements of (eps_hat - eps)^2, averaged over
  the update's samples (official: the diffusion wrapper sums it over the batch and fairseq's trainer
  divides the gradients by the criterion's sample_size, the number of samples in the update, before
  clipping; the logged loss is that mean too).
- laion captions of more than `max_laion_caption_tokens` (128) pieces are skipped, as the official LAION loader
  does (its 384-pixel minimum side is the data's: `train.data ingest-pairs --min-side`);
- optional, not in the official recipe: `caption_teacher_weight` w > 0 adds w x the mean squared
  difference between the condition and the CLIP text encoder's states of the sample's caption (the
  empty caption for unconditional samples), averaged the same way. It distils the text route, which
  stage 2 aligned, into the image route. At small batch the diffusion loss alone moves the image
  route too slowly: in the nano run (batch 8), 500 steps without it left the subjects' colour and
  shape at chance (judged right in 0.15 / 0.20 of 20 one-subject cases, though a linear probe reads
  both from the condition), 500 steps with it 0.85 / 0.70.

Trainable: MLLM, connector, aligner, vision last block + ln_post. Frozen: the rest of the vision
tower and the score model (diffusers SD1.5 or nano, see train/score_model.py).

    python -m train.stage3 --config train/configs/stage3.yaml --init-checkpoint runs/stage2 \\
        --score-model models/stable-diffusion-v1-5
    accelerate launch --mixed_precision bf16 -m train.stage3 --config train/configs/stage3.yaml
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kosmosg_core.checkpoint import RECONSTRUCTION_KEY_PREFIXES
from kosmosg_core.config import BOS_ID
from kosmosg_core.prompt import build_prompt_ids
from train.common.config import parse_config
from train.common.seeds import sample_generator, sample_rng
from train.inputs import check_images_readable, choose_interleaved, entity_pixels, pad_rows, target_pixels
from train.loop import MLLMTrainingConfig, Stage, equal_shares, run_as_script, run_training
from train.model_init import build_kosmosg, clip_token_ids, frozen_dtype, load_clip_text, replace_config, set_trainable
from train.score_model import load_score_model



@dataclass
class Stage3Config(MLLMTrainingConfig):
    output_dir: str = field(default="runs/stage3", metadata={"help": "run folder"})
    score_model: str = field(default="", metadata={
        "help": "frozen SD1.5 score model: diffusers folder (unet/, vae/), SD1.5 single file, or nano .safetensors"})
    score_model_kind: str = field(default="auto", metadata={"help": "auto | diffusers | nano"})
    resolution: int = field(default=512, metadata={"help": "target image size (official 512)"})
    uncond_prob: float = field(default=0.1, metadata={"min": 0, "max": 1,
                                                      "help": "replace the condition by the unconditional one (0.1)"})
    drop_caption_prob: float = field(default=0.5, metadata={"min": 0, "max": 1,
        "help": "use text_dropped (entity words / IP2P input caption removed) with this p (official 0.5)"})
    caption_teacher_weight: float = field(default=0.0, metadata={"min": 0,
        "help": "weight of the caption-teacher loss (0 = official: diffusion loss only); needs --clip-text-encoder"})
    clip_text_encoder: str = field(default="", metadata={
        "help": "the CLIP text encoder + tokenizer the caption teacher reads (as stage 2's --clip-text-encoder)"})
    max_laion_caption_tokens: int = field(default=128, metadata={
        "min": 1, "help": "skip laion captions of more SentencePiece pieces (official LAION loader: 128)"})


class DiffusionModule(nn.Module):
    """forward(batch) -> (this micro-batch's share of the update's mean per-sample eps-MSE [+ w x caption-teacher
    MSE], {"uncond_fraction"[, "caption_mse"]}): its per-sample sum over the update's sample count."""

    def __init__(self, model, score, num_shares: int, clip_text=None, caption_teacher_weight: float = 0.0):
        super().__init__()
        self.model = model
        # plain dict: not submodules, never saved, wrapped or trained
        self.frozen = {"score": score, "clip_text": clip_text}
        self.num_shares = num_shares  # equal micro-batches per update, all processes
        self.caption_teacher_weight = caption_teacher_weight

    def forward(self, batch: dict):
        condition = self.model(batch["input_ids"], batch["image_mask"], pixel_values=batch["pixel_values"])  # [B,77,C]
        uncond = batch["uncond"]  # [B] bool
        if batch["update_has_uncond"]:  # decided per update, so every process runs the same forwards (FSDP)
            bos = torch.full((1, 1), BOS_ID, dtype=torch.long, device=condition.device)
            null = self.model(bos, torch.zeros_like(bos, dtype=torch.bool))  # [1, 77, C], with gradients
            condition = torch.where(uncond[:, None, None], null.expand_as(condition), condition)
        eps = self.frozen["score"].predict_noise(batch["noisy_latents"], batch["timesteps"], condition)
        per_sample = F.mse_loss(eps.float(), batch["noise"].float(), reduction="none").mean(dim=(1, 2, 3))  # [B]
        update_samples = len(uncond) * self.num_shares  # equal micro-batches, all processes
        metrics = {"uncond_fraction": uncond.float().sum() / update_samples}
        if "clip_ids" not in batch:
            return per_sample.sum() / update_samples, metrics
        with torch.no_grad():
            target = self.frozen["clip_text"](batch["clip_ids"]).last_hidden_state.float()  # [B, 77, C]
        # samples without a caption (has_caption False) get no teacher term
        teacher = F.mse_loss(condition.float(), target, reduction="none").mean(dim=(1, 2)) * batch["has_caption"]  # [B]
        metrics["caption_mse"] = teacher.detach().sum() / update_samples
        return (per_sample.sum() + self.caption_teacher_weight * teacher.sum()) / update_samples, metrics


class Stage3(Stage):
    name = "stage3"
    resume_may_change = frozenset({"score_model", "clip_text_encoder"})  # paths: the frozen models may move
    earlier_version_note = ("stage 3's loss is now the update's per-sample mean (it was the sum over the batch), so "
                            "its gradients are 1/batch of the earlier ones: clip_norm clips less than it did")

    def check_settings(self, cfg: Stage3Config) -> None:
        if cfg.resolution < 8 or cfg.resolution % 8:
            raise ValueError(f"--resolution {cfg.resolution}: use a multiple of 8 (the VAE's latent grid; "
                             "SD1.5: 512).")
        if not cfg.score_model:
            raise ValueError("--score-model is required: a diffusers SD1.5 folder, an SD1.5 single file or a nano "
                             ".safetensors (train/score_model.py).")
        if cfg.caption_teacher_weight > 0 and not cfg.clip_text_encoder:
            raise ValueError(f"--caption-teacher-weight {cfg.caption_teacher_weight} needs --clip-text-encoder: the "
                             "CLIP text encoder + tokenizer of the score model (as stage 2's).")

    def build(self, cfg: Stage3Config, accelerator):
        self.accelerator = accelerator
        self.score = load_score_model(cfg.score_model, cfg.score_model_kind)
        self.score.to(accelerator.device, frozen_dtype(cfg))
        if cfg.gradient_checkpointing:
            self.score.enable_gradient_checkpointing()

        def adjust(model_cfg):
            return replace_config(model_cfg, aligner={"with_reconstruction": False}, **cfg.training_switches())

        # a stage-2 checkpoint's reconstruction branch is not part of this model: discarded
        model = build_kosmosg(cfg, self.tokenizer, adjust,
                              ignore=RECONSTRUCTION_KEY_PREFIXES)
        if model.cfg.aligner.width != self.score.context_dim:
            raise ValueError(f"aligner width {model.cfg.aligner.width} != score model context width "
                             f"{self.score.context_dim}; the U-Net must read the aligner's output (SD1.5: 768).")
        model.aligner.set_gradient_checkpointing(cfg.gradient_checkpointing)
        set_trainable(model, decoder=True, connector=True, aligner=True, vision_last=True)
        self._model_cfg = model.cfg
        clip_text = None
        if cfg.caption_teacher_weight > 0:
            self.clip_tokenizer, clip_text = load_clip_text(cfg.clip_text_encoder)
            if clip_text.config.hidden_size != model.cfg.aligner.width:
                raise ValueError(f"--clip-text-encoder {cfg.clip_text_encoder}: width {clip_text.config.hidden_size} "
                                 f"!= aligner width {model.cfg.aligner.width}; give the text encoder of the score model.")
            clip_text.to(accelerator.device, frozen_dtype(cfg))
        return DiffusionModule(model, self.score, equal_shares(cfg, accelerator), clip_text,
                               cfg.caption_teacher_weight).to(accelerator.device)

    def select(self, record):
        meta = record.meta
        rng = sample_rng(self.cfg.seed, self.name, record.epoch, record.sample_id)
        choice = choose_interleaved(meta, rng, self.cfg.drop_caption_prob, self.cfg.masked_entity_prob)
        uncond = rng.random() < self.cfg.uncond_prob
        prompt = build_prompt_ids(self.tokenizer, choice.text, len(choice.image_fields),
                                  self._model_cfg.image_token_slots)
        if meta.get("kind") == "laion" and len(prompt) - 1 > self.cfg.max_laion_caption_tokens:  # [<s>] + caption
            return None
        if self.too_long(record.key, len(prompt)):
            return None
        check_images_readable(record.fields, choice.image_fields + [choice.target_field], record.key)
        # the caption teacher's text: what the target shows (an InstructPix2Pix caption is its source image's)
        caption = "" if meta.get("kind") == "instructpix2pix" else (meta.get("caption") or "").strip()
        return {"key": record.key, "sample_id": record.sample_id, "epoch": record.epoch, "prompt": prompt,
                "fields": choice.image_fields,
                "target": choice.target_field, "uncond": uncond, "record": record.fields, "caption": caption}

    def collate(self, mine, global_items, step, device):
        ids, mask = pad_rows([it["prompt"] for it in global_items], [it["prompt"] for it in mine])
        pixels = [p for it in mine for p in entity_pixels(it["record"], it["fields"], self._model_cfg.vision.image_size,
                                                         it["key"])]
        targets = torch.stack([target_pixels(it["record"][it["target"]], self.cfg.resolution, f"{it['key']}.target")
                               for it in mine])  # [B, 3, R, R] in [-1, 1]
        # per-sample noise: seeded by (seed, step, sample), so independent of the batch split
        gens = [sample_generator(self.cfg.seed, "noise", step, it["epoch"], it["sample_id"]) for it in mine]
        latent_noise, noise, timesteps = draw_diffusion_noise(gens, self.score.latent_shape(self.cfg.resolution),
                                                              self.score.num_train_timesteps)
        latents = self.score.encode_latents(targets, latent_noise).float()  # [B, 4, h, w]
        noise = noise.to(latents.device)
        noisy = self.score.add_noise(latents, noise, timesteps.to(latents.device))
        # FSDP gathers each layer's weights inside forward: all processes must run the null forward or none
        has_uncond = any(it["uncond"] for it in global_items)
        if self.cfg.data_split == "shards":  # global_items are this process's only: ask the others
            has_uncond = bool(self.accelerator.reduce(torch.tensor(int(has_uncond), device=device), reduction="sum"))
        batch = {
            "input_ids": ids.to(device),
            "image_mask": mask.to(device),
            "pixel_values": torch.stack(pixels).to(device) if pixels else None,
            "noisy_latents": noisy.to(device),
            "timesteps": timesteps.to(device),
            "update_has_uncond": has_uncond,
            "noise": noise.to(device),
            "uncond": torch.tensor([it["uncond"] for it in mine], dtype=torch.bool, device=device),
        }
        if self.cfg.caption_teacher_weight > 0:
            # the teacher's target: the caption's text-encoder states; the empty caption's for unconditional samples
            captions, has_caption = caption_teacher_targets(mine)
            clip_ids = clip_token_ids(self.clip_tokenizer, captions, self._model_cfg.aligner.num_queries)
            batch["clip_ids"] = clip_ids.to(device)
            batch["has_caption"] = torch.tensor(has_caption, dtype=torch.float32, device=device)
        return batch


def draw_diffusion_noise(generators: list[torch.Generator], latent_shape, num_train_timesteps: int):
    """Each sample's own draws, in this order: the VAE sampling noise, the diffusion noise (both `latent_shape`,
    [4, h, w]) and a timestep uniform in [0, num_train_timesteps) -> (latent_noise [B, 4, h, w],
    noise [B, 4, h, w], timesteps [B])."""
    latent_noise = torch.stack([torch.randn(latent_shape, generator=g) for g in generators])
    noise = torch.stack([torch.randn(latent_shape, generator=g) for g in generators])
    timesteps = torch.cat([torch.randint(0, num_train_timesteps, (1,), generator=g) for g in generators])
    return latent_noise, noise, timesteps


def caption_teacher_targets(items: list[dict]) -> tuple[list[str], list[float]]:
    """The caption teacher's text per sample and whether it counts: an unconditional sample's target is the
    empty caption's states (it counts); a conditional sample without a caption (an InstructPix2Pix one: its
    caption describes the source image, not the target) has no target."""
    captions = ["" if it["uncond"] else it["caption"] for it in items]
    return captions, [float(it["uncond"] or bool(it["caption"])) for it in items]


def main(argv=None) -> dict:
    cfg = parse_config(Stage3Config, argv, description=__doc__)
    return run_training(Stage3(cfg), cfg)


if __name__ == "__main__":
    run_as_script(main)
