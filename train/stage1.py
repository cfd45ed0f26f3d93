"""Stage 1: multimodal language modelling of the MLLM on interleaved image-text sequences.

Sequences follow the official layout `<s> text <image> [slot]*Q </image> ... </s>`; the model reads
all but the last token and predicts the next one. Loss = token cross-entropy averaged over the
target tokens of the global batch, image slots and pads excluded (their "next token" is an image
feature, not text). Image-caption pairs (`laion` samples) become `<i> caption` with the image in
front (Kosmos-1 style); `openimage` / `instructpix2pix` samples use their interleaved text.

Trains the MLLM, the connector and the vision tower's last block + ln_post (the aligner is not
used here and stays frozen). From scratch (`--model-config`) or continuing (`--init-checkpoint`).

    python -m train.stage1 --config train/configs/stage1.yaml --data data/mix --tokenizer data/tok
    accelerate launch -m train.stage1 --config train/configs/stage1.yaml
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kosmosg_core.config import IMAGE_PLACEHOLDER, PAD_ID
from train.common.config import parse_config
from train.common.seeds import sample_rng
from train.inputs import check_images_readable, choose_interleaved, entity_pixels, pad_rows, prompt_with_eos
from train.loop import MLLMTrainingConfig, Stage, run_as_script, run_training
from train.model_init import build_kosmosg, replace_config, set_trainable

IGNORE_INDEX = -100


@dataclass
class Stage1Config(MLLMTrainingConfig):
    output_dir: str = field(default="runs/stage1", metadata={"help": "run folder"})
    image_text_pairs: bool = field(default=True, metadata={
        "help": "laion samples as '<i> caption' with their image (else caption only)"})


class LanguageModelingModule(nn.Module):
    """forward(batch) -> (share of the global mean token CE, {})."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict):
        pixels = batch["pixel_values"]
        image_embeds = self.model.encode_images(pixels) if pixels is not None else None  # [N, Q, D]
        hidden = self.model.mllm_hidden(batch["input_ids"], batch["image_mask"], image_embeds)  # [B, T, D]
        logits = self.model.decoder.lm_logits(hidden)  # [B, T, V]
        ce_sum = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="sum")
        return ce_sum / batch["global_target_tokens"], {}


class Stage1(Stage):
    name = "stage1"

    def build(self, cfg: Stage1Config, accelerator):
        self.accelerator = accelerator

        def adjust(model_cfg):
            return replace_config(model_cfg, **cfg.training_switches())

        model = build_kosmosg(cfg, self.tokenizer, adjust)
        set_trainable(model, decoder=True, connector=True, aligner=False, vision_last=True)
        self._model_cfg = model.cfg
        return LanguageModelingModule(model).to(accelerator.device)

    def select(self, record):
        meta = record.meta
        rng = sample_rng(self.cfg.seed, self.name, record.epoch, record.sample_id)
        if meta.get("kind") == "laion":
            if not self.cfg.image_text_pairs:
                text, fields = meta["caption"], []
            else:
                text, fields = IMAGE_PLACEHOLDER + meta["caption"], ["target.png"]
        else:
            choice = choose_interleaved(meta, rng, drop_prob=0.0, masked_prob=self.cfg.masked_entity_prob)
            text, fields = choice.text, choice.image_fields
        prompt = prompt_with_eos(self.tokenizer, text, len(fields), self._model_cfg.image_token_slots)
        if self.too_long(record.key, len(prompt) - 1):  # the model reads all but the last token
            return None
        check_images_readable(record.fields, fields, record.key)
        return {"key": record.key, "prompt": prompt, "fields": fields, "record": record.fields}

    @staticmethod
    def _targets(ids: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        """ids / mask [B, T+1] -> next-token targets [B, T]: pads and image slots ignored."""
        targets = ids[:, 1:].clone()
        targets[image_mask[:, 1:] | ids[:, 1:].eq(PAD_ID)] = IGNORE_INDEX
        return targets

    def collate(self, mine, global_items, step, device):
        ids, mask = pad_rows([it["prompt"] for it in global_items], [it["prompt"] for it in mine])  # [b, T+1]
        targets = self._targets(ids, mask)
        # the denominator counts the targets of the whole update (every micro-batch)
        all_ids, all_mask = pad_rows([it["prompt"] for it in global_items], [it["prompt"] for it in global_items])
        total = int(self._targets(all_ids, all_mask).ne(IGNORE_INDEX).sum())
        if self.cfg.data_split == "shards":  # global_items are this process's only: add the others'
            total = int(self.accelerator.reduce(torch.tensor(total, device=device), reduction="sum"))
        pixels = [p for it in mine for p in entity_pixels(it["record"], it["fields"], self._model_cfg.vision.image_size,
                                                         it["key"])]
        return {
            "input_ids": ids[:, :-1].to(device),
            "image_mask": mask[:, :-1].to(device),
            "targets": targets.to(device),
            "pixel_values": torch.stack(pixels).to(device) if pixels else None,
            "global_target_tokens": max(1, total),
        }


def main(argv=None) -> dict:
    cfg = parse_config(Stage1Config, argv, description=__doc__)
    return run_training(Stage1(cfg), cfg)


if __name__ == "__main__":
    run_as_script(main)
