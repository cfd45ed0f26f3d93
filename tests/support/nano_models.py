"""Fixture-size nano models in the shipped formats, for the `train.eval nano*` tests (random weights, CPU).

write_shipped_nano_sd   the nano SD1.5 layout written by the real export path (train.nano.export_nano):
                        nano-sd15.safetensors (random 16-channel U-Net + random TAESD) + text-encoder/
write_kosmosg_nano_pack a Kosmos-G pack .safetensors of the tiny config with the real nano tokenizer
                        inside (kosmosg_core.checkpoint.save_pack_checkpoint), 768-wide output
"""

from __future__ import annotations

from pathlib import Path

import torch

from kosmosg_core.checkpoint import save_pack_checkpoint
from kosmosg_core.config import SD15_CONTEXT_DIM, KosmosGConfig
from kosmosg_core.tokenizer import KosmosGTokenizer

from .tiny_kosmosg import random_kosmosg


def write_shipped_nano_sd(root) -> dict:
    """-> {"checkpoint", "text_encoder": shipped paths, "unet", "vae": the networks they came from}."""
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    from train.nano import export_nano
    from train.nano import text_encoder as te
    from train.nano.nano_data import world_vocabulary
    from train.nano.taesd import TinyAutoencoder
    from train.nano.train_unet import save_ema
    from train.nano.unet import NanoUNet, NanoUNetConfig

    root = Path(root)
    torch.manual_seed(0)
    tokenizer = te.load_tokenizer(te.write_tokenizer_files(world_vocabulary(), root / "tokenizer"))
    text_model = CLIPTextModel(te.text_config(tokenizer, layers=1, intermediate=64, heads=8)).eval()
    te.save_text_encoder(text_model, tokenizer, root / "te", dtype=torch.float32)
    unet = NanoUNet(NanoUNetConfig(real_channels=16))
    unet.reset_parameters(zero_init_residual=False)  # random but non-trivial
    save_ema(root / "unet_ema.safetensors", unet)
    vae = TinyAutoencoder()
    vae.set_scale_shift(1.3, 0.1)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(root / "vae.safetensors"))
    out = export_nano.export(export_nano.ExportConfig(unet=str(root / "unet_ema.safetensors"),
                                                      vae=str(root / "vae.safetensors"),
                                                      text_encoder=str(root / "te"), out_dir=str(root / "models")))
    return {"checkpoint": out["checkpoint"], "text_encoder": out["text_encoder"], "unet": unet, "vae": vae}


def write_kosmosg_nano_pack(root, seed: int = 0, name: str = "kosmosg-nano.safetensors") -> Path:
    """A tiny random Kosmos-G (KosmosGConfig.tiny at the nano vocabulary, 768-wide aligner) with the
    nano tokenizer embedded, as train.export writes it -> its path."""
    from train.nano import nano_tokenizer

    root = Path(root)
    tokenizer = KosmosGTokenizer.from_dir(nano_tokenizer.write_tokenizer(root / "kosmosg-tokenizer"))
    cfg = KosmosGConfig.tiny(vocab_size=tokenizer.vocab_size, context_dim=SD15_CONTEXT_DIM)
    return save_pack_checkpoint(random_kosmosg(cfg, seed), tokenizer, root / name)
