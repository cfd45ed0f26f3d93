"""Kosmos-G: vision encoder -> connector -> MLLM -> AlignerNet, producing SD1.5 conditioning.

Glossary: B prompts, T tokens, N images, Q slots per image, D MLLM width, C context width.
"""

from __future__ import annotations

import torch
from torch import nn

from .aligner import Aligner
from .config import PAD_ID, KosmosGConfig
from .connector import Connector
from .decoder import Decoder
from .vision import VisionEncoder


class KosmosG(nn.Module):
    """The whole inference model: `encode_images` (pixels -> image slots), `mllm_hidden` (tokens with the slots
    written in -> MLLM states), and `forward` (-> the aligner's SD1.5 conditioning [B, 77, C])."""

    def __init__(self, cfg: KosmosGConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.connector = Connector(cfg.vision.width, cfg.decoder.width, cfg.connector)
        self.decoder = Decoder(cfg.decoder)
        self.aligner = Aligner(cfg.aligner, cfg.decoder.width)

    @property
    def context_dim(self) -> int:
        return self.cfg.aligner.width

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] -> image embeddings [N, Q, D] (the MLLM's image slots)."""
        return self.connector(self.vision(pixel_values))

    def mllm_hidden(self, input_ids: torch.Tensor, image_mask: torch.Tensor,
                    image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, T] + image embeddings [N, Q, D] -> MLLM last hidden state [B, T, D]."""
        flat = image_embeds.reshape(-1, image_embeds.shape[-1]) if image_embeds is not None else None
        return self.decoder(input_ids, flat, image_mask)

    def forward(self, input_ids: torch.Tensor, image_mask: torch.Tensor,
                image_embeds: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """-> conditioning [B, 77, C] for the U-Net's cross-attention.

        Give either `image_embeds` [N, Q, D] (e.g. from a cache) or `pixel_values` [N, 3, S, S];
        images fill the prompt's image slots in order (prompt 0's images first)."""
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.encode_images(pixel_values)
        hidden = self.mllm_hidden(input_ids, image_mask, image_embeds)
        return self.aligner(hidden, padding_mask=input_ids.eq(PAD_ID))
