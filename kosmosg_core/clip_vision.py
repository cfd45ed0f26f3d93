"""A transformers CLIP vision tower -> `VisionEncoder` weights (official stage 1 starts from CLIP ViT-L/14).

Reads a folder written by `save_pretrained` of a `CLIPVisionModel` (e.g. the nano tower in
`<text-encoder run>/vision-tower/`) or a whole `CLIPModel` (e.g. openai/clip-vit-large-patch14), checks
its config against our `VisionConfig` and renames the tensors to `VisionEncoder` names. The networks are
the same up to the last block; only the ends differ on purpose (see vision.py): we apply `ln_post`
(HF `post_layernorm`) to every token and L2-normalise, HF applies it to CLS only (`pooler_output`).

transformers is imported only to read the config (it fills in the defaults `save_pretrained` leaves out).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from .config import CLIP_MEAN, CLIP_STD, VisionConfig
from .errors import CheckpointError, CheckpointNotFoundError

logger = logging.getLogger(__name__)

# HF CLIPVisionTransformer name -> VisionEncoder name (after the `vision_model.` prefix is removed).
HF_CLIP_VISION_RENAMES = [
    (r"^embeddings\.class_embedding$", "class_embedding"),
    (r"^embeddings\.patch_embedding\.weight$", "conv1.weight"),
    (r"^embeddings\.position_embedding\.weight$", "positional_embedding"),
    (r"^pre_layrnorm\.", "ln_pre."),  # sic: HF's spelling
    (r"^encoder\.layers\.(\d+)\.self_attn\.", r"resblocks.\1.attn."),  # q_proj / k_proj / v_proj / out_proj
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"resblocks.\1.ln_1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"resblocks.\1.ln_2."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.", r"resblocks.\1.mlp.c_fc."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.", r"resblocks.\1.mlp.c_proj."),
    (r"^post_layernorm\.", "ln_post."),
]
# Keys of a CLIPModel / CLIPVisionModelWithProjection that are not the vision tower, and an old buffer.
HF_CLIP_KEYS_TO_IGNORE = r"^(text_model\.|text_projection\.|visual_projection\.|logit_scale$|embeddings\.position_ids$)"

_RENAMES = [(re.compile(p), r) for p, r in HF_CLIP_VISION_RENAMES]
_IGNORE = re.compile(HF_CLIP_KEYS_TO_IGNORE)


def convert_hf_clip_vision_state_dict(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIPVisionModel / CLIPVisionTransformer / CLIPModel state dict -> `VisionEncoder` state dict."""
    ours = {}
    for key, tensor in hf_state.items():
        name = key.removeprefix("vision_model.")
        if _IGNORE.search(name):
            continue
        for pattern, replacement in _RENAMES:
            if pattern.search(name):
                ours[pattern.sub(replacement, name, count=1)] = tensor
                break
        else:
            raise CheckpointError(f"Unknown CLIP vision tensor {key!r}: not a transformers CLIPVisionModel / CLIPModel "
                                  "state dict. Give a folder written by CLIPVisionModel/CLIPModel.save_pretrained.")
    return ours


def hf_clip_vision_mismatches(hf_config: dict, cfg: VisionConfig) -> list[str]:
    """Differences between an HF CLIPVisionConfig (as a dict) and ours, each as 'hf_name X != vision.our_name Y'."""
    pairs = [("hidden_size", "width", cfg.width), ("num_hidden_layers", "layers", cfg.layers),
             ("num_attention_heads", "heads", cfg.heads), ("patch_size", "patch_size", cfg.patch_size),
             ("image_size", "image_size", cfg.image_size),
             ("intermediate_size", "width * mlp_ratio", int(cfg.width * cfg.mlp_ratio)),
             ("layer_norm_eps", "layer_norm_eps", cfg.layer_norm_eps), ("num_channels", "RGB channels", 3)]
    return [f"{hf_name} {hf_config.get(hf_name)} != vision.{ours} {value}"
            for hf_name, ours, value in pairs if hf_config.get(hf_name) != value]


def check_hf_clip_vision_config(hf_config: dict, cfg: VisionConfig, source: str) -> None:
    """Refuse a tower whose activation or sizes differ from `cfg` (its weights would not mean the same)."""
    if hf_config.get("hidden_act") != "quick_gelu":
        raise CheckpointError(f"{source}: the CLIP vision tower uses hidden_act={hf_config.get('hidden_act')!r}; Kosmos-G's "
                              "vision encoder uses QuickGELU (OpenAI CLIP, hidden_act='quick_gelu'), so its weights "
                              "would compute something else. Use a quick_gelu CLIP (e.g. openai/clip-vit-large-patch14).")
    mismatches = hf_clip_vision_mismatches(hf_config, cfg)
    if mismatches:
        raise CheckpointError(f"{source}: the CLIP vision tower does not fit the model's vision config: "
                              f"{'; '.join(mismatches)}. Use a tower of the same size or change the model config's "
                              "'vision' part to match it.")


def read_hf_clip_vision_folder(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """A `save_pretrained` folder -> (CLIPVisionConfig as a dict, the raw HF tensors of its vision tower).

    Weights: model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin (read
    with weights_only=True). From a CLIPModel only the `vision_model.` tensors are read."""
    from transformers import CLIPVisionConfig

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"CLIP vision folder {folder} not found; give a folder written by CLIPVisionModel "
                                      "or CLIPModel .save_pretrained (the nano configs: the vision-tower/ that "
                                      "python -m train.nano.train_text_encoder writes).")
    if not (folder / "config.json").is_file():
        raise CheckpointNotFoundError(f"{folder}: no config.json; give a folder written by CLIPVisionModel or "
                                      "CLIPModel .save_pretrained (e.g. a download of openai/clip-vit-large-patch14).")
    hf_config = CLIPVisionConfig.from_pretrained(str(folder)).to_dict()  # a CLIPModel's vision_config
    return hf_config, _read_vision_tensors(folder)


def _read_vision_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    is_vision = lambda key: not _IGNORE.search(key.removeprefix("vision_model."))  # noqa: E731
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return {k: v for k, v in state.items() if is_vision(k)}
    else:
        raise CheckpointNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or "
                                      "pytorch_model.bin beside config.json.")
    tensors = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if is_vision(k)})
    return tensors


def read_pixel_normalisation(folder) -> tuple[list[float], list[float]]:
    """(image_mean, image_std) the tower was trained with: `preprocessor_config.json` (a
    CLIPImageProcessor's) when the folder has one, else CLIP's (what every OpenAI/OpenCLIP tower uses)."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return list(CLIP_MEAN), list(CLIP_STD)
    data = json.loads(path.read_text())
    return list(data.get("image_mean", CLIP_MEAN)), list(data.get("image_std", CLIP_STD))


def fold_pixel_normalisation(state: dict[str, torch.Tensor], mean: list[float], std: list[float]) -> None:
    """Make a tower trained on `(pixels - mean) / std` take Kosmos-G's CLIP-normalised pixels (in place).

    With x = (p - CLIP_MEAN) / CLIP_STD, the tower's input is a x + b per channel, a = CLIP_STD / std,
    b = (CLIP_MEAN - mean) / std. The patch convolution is linear and its patches do not overlap
    (no padding), so conv1(a x + b) = conv1'(x) + offset exactly: conv1' scales its input channels
    by a, and the constant offset (conv1 of the constant image b) joins the patch tokens' positions."""
    weight = state["conv1.weight"].double()  # [W, 3, p, p]
    a = torch.tensor(CLIP_STD, dtype=torch.float64) / torch.tensor(std, dtype=torch.float64)  # [3]
    b = (torch.tensor(CLIP_MEAN, dtype=torch.float64) - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(
        std, dtype=torch.float64)  # [3]
    offset = torch.einsum("ocij,c->o", weight, b)  # [W]
    state["conv1.weight"] = (weight * a[None, :, None, None]).to(state["conv1.weight"].dtype)
    positions = state["positional_embedding"].double().clone()  # [1+P, W]
    positions[1:] += offset  # patch tokens only; the class token does not pass through conv1
    state["positional_embedding"] = positions.to(state["positional_embedding"].dtype)


def load_hf_clip_vision(vision, folder) -> None:
    """Check, convert and load the CLIP tower in `folder` into `vision` (a VisionEncoder), every tensor.

    A tower trained with other pixel normalisation than CLIP's (its `preprocessor_config.json`) gets
    it folded into its patch embedding, so it sees exactly what it was trained on."""
    hf_config, hf_state = read_hf_clip_vision_folder(folder)
    check_hf_clip_vision_config(hf_config, vision.cfg, str(folder))
    state = convert_hf_clip_vision_state_dict(hf_state)
    mean, std = read_pixel_normalisation(folder)
    if (mean, std) != (list(CLIP_MEAN), list(CLIP_STD)) and "conv1.weight" in state:
        fold_pixel_normalisation(state, mean, std)
        logger.info("vision encoder: folded the tower's pixel normalisation (mean %s, std %s) into conv1", mean, std)
    from .checkpoint import state_dict_mismatch

    expected = vision.state_dict()
    mismatch = state_dict_mismatch(expected, state)
    if mismatch:
        raise CheckpointError(f"{folder}: the CLIP vision weights do not match the config ({mismatch}); the folder "
                              "may be truncated.")
    vision.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    logger.info("vision encoder: %d tensors from the CLIP tower in %s", len(state), folder)
