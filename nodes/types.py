"""The pack's custom socket types and the values that travel through them.

Type names are part of every saved workflow: never rename them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from comfy_api.latest import io

CATEGORY = "Kosmos-G"

# Socket types (stable forever: saved workflows reference them by name).
KosmosGModelType = io.Custom("KOSMOSG_MODEL")
KosmosGPromptType = io.Custom("KOSMOSG_PROMPT")


@dataclass
class KosmosGPrompt:
    """What the Interleaved Prompt node hands to Encode.

    text: the prompt with one `<i>` per image, in socket order.
    images: one ComfyUI IMAGE per placeholder, each [B_i, H, W, 3] float 0..1; every B_i is 1 or
        `batch_size` (a batch of B images on one socket gives B conditionings, sample b using image b).
    weights: one multiplier per image from the node's `weights` list (1.0 = the official model); a weight written
        in the text (`<i:0.8>`) multiplies with it when the text is encoded.
    """

    text: str
    images: list[torch.Tensor] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return max((int(img.shape[0]) for img in self.images), default=1)

    def images_for_sample(self, index: int) -> list[torch.Tensor]:
        """The images of batch sample `index`, one [H, W, 3] tensor per placeholder (batch-1 sockets broadcast)."""
        return [img[min(index, img.shape[0] - 1)] for img in self.images]

    def fingerprint(self) -> str:
        """Content hash: equal prompts (same text, weights, pixels) give equal fingerprints."""
        digest = hashlib.sha256()
        # surrogatepass: text that is not valid Unicode still gets a key; the encoder names the fault
        digest.update(self.text.encode("utf-8", "surrogatepass"))
        digest.update(repr([float(w) for w in self.weights]).encode())
        for img in self.images:
            pixels = img.detach().to("cpu", torch.float32).contiguous()
            # the dtype too: uint8 1 (nearly black) and float 1.0 (white) hash to the same float32 pixels
            digest.update(repr((tuple(pixels.shape), img.dtype)).encode())
            digest.update(pixels.numpy())  # hashed in place: tobytes() copied the whole batch
        return digest.hexdigest()
