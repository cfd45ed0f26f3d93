"""Feature extractors given by local path (never downloaded): DINO, CLIP and Inception.

- `DinoFeatures`: a transformers `ViTModel` (e.g. facebook/dino-vits16, the paper's DINO ViT-S/16) or
  `Dinov2Model` folder -> the CLS token of the last hidden state (after the final layer norm), the
  feature DINO's own `forward` returns. Preprocessing as the official Kosmos-G eval: bicubic resize
  to size * 256 / 224, centre crop, ImageNet mean / std.
- `ClipFeatures`: a transformers `CLIPModel` folder (with its image processor and tokenizer; the
  official eval uses openai/clip-vit-base-patch32) -> projected image / text embeddings.
- `InceptionFeatures`: torchvision `inception_v3` weights file (`.pth` / `.safetensors`), or a
  transformers image-model folder -> one pooled feature vector per image (2048-d for Inception).

Each returns `[N, D]` float32 CPU tensors, computed in batches under `torch.no_grad()`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from .images import resize_center_crop

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def require_model_folder(path: str, flag: str, what: str) -> Path:
    """A transformers `save_pretrained` folder, or a ValueError naming the flag and the fix."""
    if not path:
        raise ValueError(f"{flag} is required: give the local folder of {what} (a transformers save_pretrained "
                         "folder with config.json; nothing is downloaded).")
    folder = Path(path)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ValueError(f"{flag} {path}: not a transformers model folder (no config.json there); give the local "
                         f"folder of {what}.")
    return folder


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL RGB images of one size -> [N, 3, H, W] float32 in [0, 1]."""
    import numpy as np

    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images]) / 255.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def as_images(items: Sequence) -> list[Image.Image]:
    """PIL images or image paths -> PIL RGB images (paths are read here, one batch at a time)."""
    from .images import load_rgb

    return [item if isinstance(item, Image.Image) else load_rgb(item) for item in items]


def batched(items: Sequence, batch_size: int, embed: Callable[[list], torch.Tensor]) -> torch.Tensor:
    """Run `embed` over `items` in chunks -> [N, D] float32 on CPU."""
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size}: must be at least 1")
    chunks = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunks.append(embed(list(items[start:start + batch_size])).float().cpu())
    return torch.cat(chunks)


def _pooled(output) -> torch.Tensor:
    """transformers 4 returns a tensor from get_*_features, 5 a ModelOutput whose pooler_output it is."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class DinoFeatures:
    """DINO / DINOv2 CLS features: images -> [N, D]."""

    def __init__(self, path: str, device: torch.device, image_size: int = 224, batch_size: int = 16,
                 flag: str = "--dino-model"):
        from transformers import AutoModel

        folder = require_model_folder(path, flag, "a DINO ViT (ViTModel, e.g. dino-vits16) or Dinov2Model")
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
        kind = self.model.config.model_type
        if kind not in ("vit", "dinov2"):
            raise ValueError(f"{flag} {path}: a {kind!r} model; DINO scores need a ViTModel (DINO) or Dinov2Model.")
        self.device, self.image_size, self.batch_size = device, image_size, batch_size
        # ViTModel refuses other sizes than its config's unless asked to interpolate positions
        self.interpolate = kind == "vit" and image_size != self.model.config.image_size

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """Images or paths -> [N, 3, S, S]: resize to S * 256 / 224 (bicubic), centre crop S, ImageNet mean / std."""
        resize = round(self.image_size * 256 / 224)
        pixels = to_tensor([resize_center_crop(im, resize, self.image_size) for im in as_images(images)])
        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
        return (pixels - mean) / std

    def _embed(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.preprocess(images).to(self.device, self.model.dtype)
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        return self.model(pixel_values=pixels, **kwargs).last_hidden_state[:, 0]  # [N, D] CLS token

    def __call__(self, images: Sequence) -> torch.Tensor:
        """PIL images or image paths -> [N, D]."""
        return batched(images, self.batch_size, self._embed)


class ClipFeatures:
    """CLIP image and text embeddings (the projected, shared space)."""

    def __init__(self, path: str, device: torch.device, batch_size: int = 16, flag: str = "--clip-model"):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        folder = require_model_folder(path, flag, "a CLIPModel (e.g. clip-vit-base-patch32)")
        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
        try:
            self.processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"{flag} {path}: the folder needs the CLIP image processor and tokenizer files too "
                             f"(save the CLIPProcessor beside the model): {e}") from e
        self.device, self.batch_size = device, batch_size
        self.max_length = self.model.config.text_config.max_position_embeddings

    def _embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=as_images(images), return_tensors="pt")["pixel_values"]
        return _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype)))

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return _pooled(self.model.get_text_features(**tokens))

    def images(self, images: Sequence) -> torch.Tensor:
        """PIL images or image paths -> [N, D] projected image embeddings."""
        return batched(images, self.batch_size, self._embed_images)

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings -> [N, D] projected text embeddings."""
        return batched(texts, self.batch_size, self._embed_texts)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # weights_only: a state dict of tensors, never arbitrary pickled objects
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"--inception {path}: holds a {type(state).__name__}, not a state dict.")
    return state


def torchvision_inception(path: Path, flag: str = "--inception") -> torch.nn.Module:
    """torchvision `inception_v3` from a weights file, classifier removed: [N, 3, 299, 299] in [-1, 1] -> [N, 2048]."""
    from torchvision.models import inception_v3

    state = _read_state_dict(path)
    state = {k: v.float() for k, v in state.items() if not k.startswith(("fc.", "AuxLogits."))}
    # transform_input=False: inputs are scaled to [-1, 1] here, which is what transform_input
    # computes from ImageNet-normalised inputs for the Google-trained weights.
    model = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
    model.fc = torch.nn.Identity()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{flag} {path}: not torchvision inception_v3 weights ({str(e)[:300]}); give "
                         "inception_v3_google-*.pth (or its .safetensors), or a transformers model folder.") from e
    return model


class InceptionFeatures:
    """Pooled features for FID: torchvision inception_v3 weights file, or a transformers image-model folder."""

    def __init__(self, path: str, device: torch.device, batch_size: int = 32, image_size: int = 299,
                 flag: str = "--inception"):
        if not path:
            raise ValueError(f"{flag} is required: give torchvision inception_v3 weights (.pth / .safetensors) or a "
                             "transformers image-model folder; nothing is downloaded.")
        source = Path(path)
        if not source.exists():
            raise ValueError(f"{flag} {path}: no such file or folder.")
        self.device, self.batch_size, self.image_size = device, batch_size, image_size
        if source.is_dir():
            from transformers import AutoImageProcessor, AutoModel

            require_model_folder(path, flag, "an image model")
            self.model = AutoModel.from_pretrained(str(source), local_files_only=True).to(device).eval()
            try:
                self.processor = AutoImageProcessor.from_pretrained(str(source), local_files_only=True)
            except (OSError, ValueError) as e:
                raise ValueError(f"{flag} {path}: the folder needs the model's image processor files: {e}") from e
            self.kind = "transformers"
        else:
            self.model = torchvision_inception(source, flag).to(device).eval()
            self.processor, self.kind = None, "torchvision-inception_v3"

    def _embed(self, images: list[Image.Image]) -> torch.Tensor:
        if self.processor is not None:
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
            output = self.model(pixel_values=pixels)
            pooled = getattr(output, "pooler_output", None)
            if pooled is None:
                pooled = output.last_hidden_state.mean(dim=1)
            return pooled.reshape(len(images), -1)
        pixels = to_tensor(images).to(self.device)
        pixels = torch.nn.functional.interpolate(pixels, size=(self.image_size, self.image_size), mode="bilinear",
                                                 align_corners=False, antialias=True)
        return self.model(pixels * 2 - 1)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return batched(images, self.batch_size, self._embed)
