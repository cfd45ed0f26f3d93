"""Stage 2: align the AlignerNet to the SD1.5 CLIP text encoder on captions (official runalign.sh).

The MLLM is frozen (no gradients) and, as officially (model.train()), runs in training mode: its dropout
(`mllm_dropout`) perturbs the aligner's input and reconstruction target. Input `[<s>] + caption + [</s>]`
minus the last token, i.e. `<s> caption`; as the official align-mode filter, captions of more than
`max_caption_tokens` (85) SentencePiece pieces or `max_clip_tokens` (75) CLIP tokens are skipped (the CLIP
target is never truncated).

    loss = mse(aligner(h), CLIPText(clip_ids).last_hidden_state)          # mean over [B, 77, C]
         + mse(aligner.reconstruct(context, T), h) * 77 / T               # mean over [B, T, D]

with the SD1.5 CLIP tokenizer padding/truncating to 77, equal weights (official). Only `aligner.*`
trains (the reconstruction branch exists only in this stage and is not exported).

    python -m train.stage2 --config train/configs/stage2.yaml --init-checkpoint runs/stage1 \\
        --clip-text-encoder models/stable-diffusion-v1-5
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kosmosg_core.checkpoint import RECONSTRUCTION_KEY_PREFIXES
from kosmosg_core.config import PAD_ID
from kosmosg_core.prompt import build_prompt_ids
from train.common.config import parse_config
from train.data.config import KINDS
from train.inputs import pad_rows
from train.loop import LoopConfig, Stage, equal_shares, run_as_script, run_training
from train.model_init import build_kosmosg, clip_token_ids, frozen_dtype, init_checkpoint_stage, is_train_checkpoint, \
    load_clip_text, replace_config, set_trainable

logger = logging.getLogger(__name__)


@dataclass
class Stage2Config(LoopConfig):
    output_dir: str = field(default="runs/stage2", metadata={"help": "run folder"})
    batch_size: int = field(default=56, metadata={"min": 1, "help": "captions per process per step (official 56/GPU)"})
    max_steps: int = field(default=300000, metadata={"min": 1, "help": "optimiser updates (official 300k)"})
    clip_text_encoder: str = field(default="", metadata={
        "help": "SD1.5 CLIP text encoder + tokenizer: a diffusers SD1.5 folder (text_encoder/, tokenizer/) or one "
                "folder holding both (transformers save_pretrained)"})
    max_caption_tokens: int = field(default=85, metadata={
        "min": 1, "help": "skip captions of more SentencePiece pieces (official align-mode filter: 85)"})
    max_clip_tokens: int = field(default=75, metadata={
        "min": 1, "help": "skip captions of more CLIP tokens (official 75: the CLIP target, 77 with its start and end "
                          "tokens, is never truncated)"})
    kinds: str = field(default="laion", metadata={
        "help": "sample kinds whose captions are used, comma-separated (official: laion only)"})
    aligner_attention_init: str = field(default="official", metadata={
        "help": "a fresh aligner's attention weights: official (PyTorch's Linear init, as the official code leaves "
                "them) | xavier (torchscale's uncalled reset_parameters: what the shipped nano's stage 2 started from)"})
    mllm_dropout: float = field(default=0.1, metadata={
        "min": 0, "max": 1, "help": "dropout in the frozen MLLM (embeddings, residuals) and the connector's attention: "
                                    "the official stage 2 runs the whole model in training mode, so its 0.1 perturbs "
                                    "the aligner's input and reconstruction target; 0 = deterministic targets"})


def explained_share(clip_mse: torch.Tensor, clip_target: torch.Tensor) -> torch.Tensor:
    """1 - clip_mse / (the targets' spread over the batch): the share of the between-caption variance
    the aligner reproduces, measured before the update (1 = exact; 0 = no better than one average
    caption for all). A low clip_mse alone can hide an aligner that learned the mean caption, which
    conditions the U-Net on nothing. 0 for a batch of one caption."""
    if clip_target.shape[0] < 2:
        return clip_mse.new_zeros(())
    spread = clip_target.var(0).mean()  # [B, 77, C] -> unbiased variance over the batch, mean over elements
    return 1.0 - clip_mse / spread.clamp_min(1e-12)


class AlignmentModule(nn.Module):
    """forward(batch) -> (share of clip_mse + reconstruction, {"clip_mse", "reconstruction", "clip_explained"})."""

    def __init__(self, model, clip_text, num_shares: int):
        super().__init__()
        self.model = model
        self.frozen = {"clip_text": clip_text}  # plain dict: not a submodule, so never saved, wrapped or trained
        self.num_shares = num_shares  # equal micro-batches per update, all processes

    def forward(self, batch: dict):
        ids = batch["input_ids"]  # [B, T]
        with torch.no_grad():
            hidden = self.model.mllm_hidden(ids, torch.zeros_like(ids, dtype=torch.bool)).float()  # [B, T, D]
            clip_target = self.frozen["clip_text"](batch["clip_ids"]).last_hidden_state.float()  # [B, 77, C]
        context = self.model.aligner(hidden, padding_mask=ids.eq(PAD_ID))  # [B, 77, C]
        clip_mse = F.mse_loss(context.float(), clip_target)
        num_tokens = ids.shape[1]
        reconstructed = self.model.aligner.reconstruct(context, num_tokens)  # [B, T, D]
        reconstruction = F.mse_loss(reconstructed.float(), hidden) * (self.model.cfg.aligner.num_queries / num_tokens)
        # equal micro-batches (all processes, all of an update): the global mean is the mean of their means
        parts = {"clip_mse": clip_mse / self.num_shares, "reconstruction": reconstruction / self.num_shares,
                 "clip_explained": explained_share(clip_mse.detach(), clip_target) / self.num_shares}
        return parts["clip_mse"] + parts["reconstruction"], parts


def official_without_aligner(path_text: str) -> bool:
    """An official-format .pt with no aligner tensor (an official stage-1 checkpoint): the official stage 2 builds
    a fresh aligner and loads the file with strict=False. Only the tensor names are read."""
    from kosmosg_core.checkpoint import official_tensor_names
    from kosmosg_core.errors import CheckpointError

    path = Path(path_text) if path_text else None
    if path is None or not path.is_file() or is_train_checkpoint(path):
        return False
    try:
        names = official_tensor_names(path)
    except (CheckpointError, OSError):  # not readable as an official .pt: the load names the problem
        return False
    return bool(names) and not any(name.startswith("aligner.") for name in names)


def parse_kinds(kinds: str) -> set[str]:
    """--kinds "laion, openimage" -> {"laion", "openimage"} (a set: order and spaces do not matter)."""
    return {kind.strip() for kind in kinds.split(",") if kind.strip()}


class Stage2(Stage):
    name = "stage2"
    resume_may_change = frozenset({"clip_text_encoder"})  # a path: the frozen text encoder may move
    model_config_flags = {"decoder.dropout": "--mllm-dropout", "connector.attention_dropout": "--mllm-dropout"}

    @staticmethod
    def comparable_settings(settings: dict) -> dict:
        kinds = settings.get("kinds")  # a set: "openimage,laion" resumes a "laion,openimage" run
        if not isinstance(kinds, str):
            return settings
        return {**settings, "kinds": ",".join(sorted(parse_kinds(kinds)))}

    def check_settings(self, cfg: Stage2Config) -> None:
        if cfg.aligner_attention_init not in ("official", "xavier"):
            raise ValueError(f"--aligner-attention-init {cfg.aligner_attention_init!r}: use official or xavier.")
        kinds = parse_kinds(cfg.kinds)
        if not kinds or kinds - set(KINDS):  # else every sample is skipped, found only after the models load
            raise ValueError(f"--kinds {cfg.kinds!r}: name sample kinds from {', '.join(KINDS)} (official: laion).")

    def __init__(self, cfg: Stage2Config):
        super().__init__(cfg)
        self.kinds = parse_kinds(cfg.kinds)

    def build(self, cfg: Stage2Config, accelerator):
        self.clip_tokenizer, clip_text = load_clip_text(cfg.clip_text_encoder)

        def adjust(model_cfg):
            # the frozen MLLM runs in training mode, as officially (model.train()): its dropout, none in its
            # attention (xformers) nor after the FFN's GELU; the connector's attention dropout
            return replace_config(model_cfg, aligner={"with_reconstruction": True},
                                  decoder={"dropout": cfg.mllm_dropout, "attention_dropout": 0.0,
                                           "activation_dropout": 0.0, "gradient_checkpointing": False},
                                  connector={"attention_dropout": cfg.mllm_dropout})

        # Stage 1 never trains the aligner (the official stage 1 has none), so a stage-1 run's aligner
        # tensors are an untrained init, possibly an older one: the aligner starts fresh here, from the
        # official init, as the official stage 2 builds it. Other sources (a stage-2 run, a pack file)
        # keep their aligner; the reconstruction branch, absent from exported files, starts fresh.
        fresh_aligner = init_checkpoint_stage(cfg.init_checkpoint) == "stage1" or \
            official_without_aligner(cfg.init_checkpoint)
        model = build_kosmosg(cfg, self.tokenizer, adjust,
                              allow_missing=("aligner.",) if fresh_aligner else RECONSTRUCTION_KEY_PREFIXES,
                              ignore=("aligner.",) if fresh_aligner else ())
        if cfg.aligner_attention_init == "xavier" and (fresh_aligner or not cfg.init_checkpoint):
            model.aligner.reset_attention_xavier()  # from a stage-1 run no draw comes between: bit for bit as before
        if clip_text.config.hidden_size != model.cfg.aligner.width:
            raise ValueError(f"CLIP text encoder width {clip_text.config.hidden_size} != aligner width "
                             f"{model.cfg.aligner.width}; use the SD1.5 text encoder (768) with a 768-wide aligner.")
        model.aligner.set_gradient_checkpointing(cfg.gradient_checkpointing)
        set_trainable(model, decoder=False, connector=False, aligner=True, vision_last=False)
        self._model_cfg = model.cfg
        clip_text.to(accelerator.device, frozen_dtype(cfg))
        return AlignmentModule(model, clip_text, equal_shares(cfg, accelerator)).to(accelerator.device)

    def select(self, record):
        meta = record.meta
        caption = (meta.get("caption") or "").strip()
        if meta.get("kind") not in self.kinds or not caption:
            return None
        prompt = build_prompt_ids(self.tokenizer, caption, 0)  # [<s>] + caption (+ </s> dropped as model input)
        if len(prompt) - 1 > self.cfg.max_caption_tokens or self.too_long(record.key, len(prompt)):
            return None
        if len(self.clip_tokenizer.tokenize(caption)) > self.cfg.max_clip_tokens:
            return None
        return {"key": record.key, "prompt": prompt, "caption": caption}

    def collate(self, mine, global_items, step, device):
        ids, _ = pad_rows([it["prompt"] for it in global_items], [it["prompt"] for it in mine])
        captions = [it["caption"] for it in mine]
        clip_ids = clip_token_ids(self.clip_tokenizer, captions, self._model_cfg.aligner.num_queries)
        return {"input_ids": ids.to(device), "clip_ids": clip_ids.to(device)}


def main(argv=None) -> dict:
    cfg = parse_config(Stage2Config, argv, description=__doc__)
    return run_training(Stage2(cfg), cfg, find_unused_parameters=False)


if __name__ == "__main__":
    run_as_script(main)
