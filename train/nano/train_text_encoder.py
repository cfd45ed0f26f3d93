"""Train the nano text encoder (CLIPTextModel, 768 wide) contrastively with a tiny vision tower.

    python -m train.nano.train_text_encoder --config train/configs/nano/text_encoder.yaml
    python -m train.nano.train_text_encoder --output-dir runs/nano/te --max-steps 400

Writes into ``--output-dir``: ``checkpoint.pt`` (every ``--save-every`` steps; the run resumes from
it when restarted), ``metrics.jsonl`` (loss, lr; every ``--eval-every`` steps on held-out scenes:
caption->image retrieval accuracy, and how often an image prefers its caption over every caption
with one shape / one colour word changed), ``tokenizer/`` (vocab.json + merges.txt), and at the end
``text-encoder/`` (CLIPTextModel + CLIPTokenizer, ``save_pretrained`` layout, fp16) and
``vision-tower/`` (CLIPVisionModel + its projection, fp32).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kosmosg_core.files import save_safetensors
from train.common.checkpointing import save_checkpoint
from train.common.config import config_to_dict, run_entry_point
from train.nano import nano_data, paths, run_utils, world
from train.nano import text_encoder as te

logger = logging.getLogger(__name__)

SUBJECT_SLOTS = 2  # subjects per scene, left to right; a missing second subject is the class "none"
ATTRIBUTES = ("colour", "shape", "position")
ATTRIBUTE_VALUES = (world.COLOURS, world.SHAPES, world.POSITIONS)  # class "none" = len(values)
HEAD_SPLITS = [len(values) + 1 for values in ATTRIBUTE_VALUES] * SUBJECT_SLOTS  # head logits per (slot, attribute)


@dataclass
class TextEncoderTrainConfig:
    output_dir: str = field(default=paths.TEXT_ENCODER_RUN, metadata={"help": "run folder (resumes from it)"})
    num_scenes: int = field(default=20000, metadata={"min": 1, "help": "training scenes rendered from the world's train stream"})
    eval_scenes: int = field(default=256, metadata={"help": "held-out scenes for the retrieval accuracy"})
    seed: int = field(default=0, metadata={"help": "seeds init and every batch draw"})
    batch_size: int = field(default=128, metadata={"min": 1, "help": "(image, caption) pairs per step"})
    max_steps: int = field(default=400, metadata={"min": 1, "help": "optimiser steps"})
    learning_rate: float = field(default=5e-4, metadata={"help": "peak AdamW learning rate"})
    warmup_steps: int = field(default=40, metadata={"min": 0, "help": "linear warm-up steps, then cosine decay to a tenth"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    clip_norm: float = field(default=1.0, metadata={"help": "gradient clipping max norm (0 = off)"})
    text_layers: int = field(default=2, metadata={"help": "CLIPTextModel layers"})
    text_intermediate: int = field(default=1024, metadata={"help": "CLIPTextModel MLP width"})
    text_heads: int = field(default=12, metadata={"help": "CLIPTextModel attention heads (768 / heads = head dim)"})
    vision_width: int = field(default=128, metadata={"help": "CLIPVisionModel width"})
    vision_layers: int = field(default=4, metadata={"help": "CLIPVisionModel layers"})
    vision_heads: int = field(default=4, metadata={"help": "CLIPVisionModel heads"})
    embed_dim: int = field(default=256, metadata={"help": "shared contrastive embedding width"})
    attribute_weight: float = field(default=0.0, metadata={
        "help": "weight of an auxiliary loss: linear heads read each subject's colour, shape and position from "
                "the pooled caption and image states (0 = plain CLIP loss, no heads)"})
    shape_negatives: int = field(default=0, metadata={
        "help": "per step, this many extra scenes: copies of batch scenes with one subject's shape changed "
                "(train split), so captions that differ only in a shape word must be told apart"})
    save_every: int = field(default=100, metadata={"min": 1, "help": "checkpoint every N steps (and at the end)"})
    eval_every: int = field(default=100, metadata={"help": "held-out retrieval accuracy every N steps (0 = end only)"})
    num_threads: int = field(default=1, metadata={"help": "torch threads (resume needs the same count)"})


def build_model(cfg: TextEncoderTrainConfig, tokenizer) -> te.ContrastivePair:
    torch.manual_seed(cfg.seed)
    model = te.ContrastivePair(
        te.text_config(tokenizer, cfg.text_layers, cfg.text_intermediate, cfg.text_heads),
        te.vision_config(cfg.vision_width, cfg.vision_layers, cfg.vision_heads),
        cfg.embed_dim,
    )
    if cfg.attribute_weight > 0:  # training-only heads, not part of the saved text encoder or vision tower
        model.text_attribute_head = torch.nn.Linear(te.CONTEXT_DIM, sum(HEAD_SPLITS))
        model.image_attribute_head = torch.nn.Linear(cfg.vision_width, sum(HEAD_SPLITS))
    return model


def attribute_labels(specs: list) -> torch.Tensor:
    """[N, SUBJECT_SLOTS * 3] class indices: (colour, shape, position) of each subject slot, left to right."""
    rows = []
    for spec in specs:
        row = []
        for slot in range(SUBJECT_SLOTS):
            subject = spec.subjects[slot] if slot < len(spec.subjects) else None
            for values, name in zip(ATTRIBUTE_VALUES, ATTRIBUTES):
                row.append(values.index(getattr(subject, name)) if subject is not None else len(values))
        rows.append(row)
    return torch.tensor(rows)


def attribute_loss(head: torch.nn.Linear, embeds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the head's SUBJECT_SLOTS x 3 attribute readings. embeds [N, E], labels [N, 6]."""
    logits = head(embeds)  # [N, sum(HEAD_SPLITS)]
    losses = [F.cross_entropy(chunk, labels[:, k]) for k, chunk in enumerate(logits.split(HEAD_SPLITS, dim=1))]
    return torch.stack(losses).mean()


def shape_swapped(specs: list, generator: torch.Generator) -> list:
    """For each spec, the same scene with one subject's shape changed (subject and new shape drawn
    from ``generator``; the new scene valid and in the train split), or None when none qualifies."""
    out = []
    for spec in specs:
        order = torch.randperm(len(spec.subjects) * len(world.SHAPES), generator=generator).tolist()
        choice = None
        for k in order:
            index, shape = divmod(k, len(world.SHAPES))
            if world.SHAPES[shape] == spec.subjects[index].shape:
                continue
            changed = world.with_attribute(spec, index, "shape", world.SHAPES[shape])
            if changed is not None and world.split_of(changed) == "train":
                choice = changed
                break
        out.append(choice)
    return out


@torch.no_grad()
def attribute_swap_accuracy(model: te.ContrastivePair, tokenizer, specs: list, images: torch.Tensor,
                            attribute: str) -> float:
    """Fraction of scenes whose image scores its own caption above every caption that differs from it
    in one subject's ``attribute`` ('shape' or 'colour'): how well the pair reads that word."""
    values = world.SHAPES if attribute == "shape" else world.COLOURS
    eos = tokenizer.eos_token_id
    model.eval()
    image_embeds = model.embed_images(nano_data.to_unit(images))  # [N, E]
    right = 0
    for spec, image_embed in zip(specs, image_embeds):
        alternatives = [world.with_attribute(spec, i, attribute, v) for i, s in enumerate(spec.subjects)
                        for v in values if v != getattr(s, attribute)]
        captions = [world.caption_of(spec)] + [world.caption_of(a) for a in alternatives if a is not None]
        scores = model.embed_text(te.trim_to_longest(te.tokenize(tokenizer, captions), eos)) @ image_embed  # [A]
        right += bool(scores[0] > scores[1:].max()) if len(scores) > 1 else True  # a tie is not reading the word
    model.train()
    return right / len(specs)


@torch.no_grad()
def head_accuracy(model: te.ContrastivePair, ids: torch.Tensor, images: torch.Tensor, specs: list, eos_id: int) -> dict:
    """Held-out accuracy of the attribute heads per tower and attribute, over the subjects present."""
    model.eval()
    labels = attribute_labels(specs)  # [N, SUBJECT_SLOTS * 3]
    pooled = {"text": (model.text_attribute_head, model.pool_text(te.trim_to_longest(ids, eos_id))),
              "image": (model.image_attribute_head, model.pool_images(nano_data.to_unit(images)))}
    out = {}
    for tower, (head, states) in pooled.items():
        readings = [chunk.argmax(1) for chunk in head(states).split(HEAD_SPLITS, dim=1)]
        for a, name in enumerate(ATTRIBUTES):
            columns = [slot * len(ATTRIBUTE_VALUES) + a for slot in range(SUBJECT_SLOTS)]
            present = torch.cat([labels[:, c] != len(ATTRIBUTE_VALUES[a]) for c in columns])
            right = torch.cat([readings[c] == labels[:, c] for c in columns])
            out[f"heldout_{tower}_head_{name}"] = (right & present).sum().item() / present.sum().item()
    model.train()
    return out


@torch.no_grad()
def retrieval_accuracy(model: te.ContrastivePair, ids: torch.Tensor, images: torch.Tensor, captions: list[str],
                       eos_id: int) -> float:
    """Fraction of held-out captions whose best-matching image (among all eval images) has that caption."""
    model.eval()
    logits = model.logits(te.trim_to_longest(ids, eos_id), nano_data.to_unit(images))
    best = logits.argmax(dim=1).tolist()
    model.train()
    return sum(captions[j] == captions[i] for i, j in enumerate(best)) / len(captions)


def train(cfg: TextEncoderTrainConfig) -> Path:
    run_utils.setup_threads(cfg.num_threads)
    out = Path(cfg.output_dir)
    tokenizer = te.load_tokenizer(te.write_tokenizer_files(nano_data.world_vocabulary(), out / "tokenizer"))
    eos = tokenizer.eos_token_id
    model = build_model(cfg, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, run_utils.warmup_cosine(cfg.warmup_steps, cfg.max_steps))
    start, metrics = run_utils.open_run(out, model, optimizer, scheduler, cfg)

    train_set = nano_data.load_scenes("train", cfg.num_scenes)
    train_ids = te.tokenize(tokenizer, train_set.captions)
    eval_set = nano_data.load_scenes("heldout", cfg.eval_scenes)
    eval_ids = te.tokenize(tokenizer, eval_set.captions)

    def save(step: int) -> None:
        save_checkpoint(out, model_state=model.state_dict(), optimizer=optimizer, scheduler=scheduler, step=step,
                        extra={"config": config_to_dict(cfg)})

    model.train()
    bar = run_utils.progress(cfg.max_steps, start, "text encoder")
    for step in range(start + 1, cfg.max_steps + 1):
        g = run_utils.step_generator(cfg.seed, step)
        idx = torch.randperm(len(train_set), generator=g)[: cfg.batch_size]
        ids, images = train_ids[idx], train_set.images[idx]
        captions = [train_set.captions[i] for i in idx.tolist()]
        swapped = []
        if cfg.shape_negatives:
            swapped = [s for s in shape_swapped([train_set.specs[i] for i in idx[: cfg.shape_negatives].tolist()], g)
                       if s is not None]
            if swapped:
                extra = [world.caption_of(s) for s in swapped]
                ids = torch.cat([ids, te.tokenize(tokenizer, extra)])
                rendered = np.stack([nano_data.render_image(s) for s in swapped])  # [H, 64, 64, 3]
                images = torch.cat([images, torch.from_numpy(rendered).permute(0, 3, 1, 2)])
                captions += extra
        same = torch.tensor([[a == b for b in captions] for a in captions])  # [B, B] identical captions
        ids, pixels = te.trim_to_longest(ids, eos), nano_data.to_unit(images)
        text_pooled, image_pooled = model.pool_text(ids), model.pool_images(pixels)
        loss = model.contrastive_loss(model.embed_text(ids, text_pooled), model.embed_images(pixels, image_pooled), same)
        if cfg.attribute_weight > 0:
            # the heads read the pooled states before the projections: the shared embedding space is
            # left to the CLIP loss, while both towers must still carry every attribute
            labels = attribute_labels([train_set.specs[i] for i in idx.tolist()] + swapped)
            aux = (attribute_loss(model.text_attribute_head, text_pooled, labels)
                   + attribute_loss(model.image_attribute_head, image_pooled, labels)) / 2
            loss = loss + cfg.attribute_weight * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        optimizer.step()
        scheduler.step()
        record = {"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]}
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps:
            record["heldout_retrieval_acc"] = retrieval_accuracy(model, eval_ids, eval_set.images, eval_set.captions, eos)
            for attribute in ("shape", "colour"):
                record[f"heldout_{attribute}_acc"] = attribute_swap_accuracy(model, tokenizer, eval_set.specs,
                                                                             eval_set.images, attribute)
            if cfg.attribute_weight > 0:
                record.update(head_accuracy(model, eval_ids, eval_set.images, eval_set.specs, eos))
        metrics.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}")
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            save(step)
    bar.close()

    te.save_text_encoder(model.text, tokenizer, out / te.TEXT_SUBFOLDER)
    vision_dir = out / te.VISION_SUBFOLDER
    model.vision.save_pretrained(str(vision_dir), safe_serialization=True)
    te.save_vision_preprocessor(vision_dir)
    save_safetensors({"visual_projection.weight": model.visual_projection.weight.detach().contiguous(),
               "text_projection.weight": model.text_projection.weight.detach().contiguous(),
               "logit_scale": model.logit_scale.detach().reshape(1)}, vision_dir / "projections.safetensors")
    logger.info("saved %s and %s", out / te.TEXT_SUBFOLDER, vision_dir)
    return out / te.TEXT_SUBFOLDER


def main(argv=None) -> Path:
    return run_entry_point(TextEncoderTrainConfig, run_utils.with_run_lock(train), argv, description=__doc__.split("\n")[0], as_script=__name__ == "__main__")


if __name__ == "__main__":
    main()
