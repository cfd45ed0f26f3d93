"""Export the trained nano image model in the shipped layout.

    python -m train.nano.export_nano --unet runs/nano/unet --vae runs/nano/vae \\
        --text-encoder runs/nano/text-encoder/text-encoder --out-dir models/nano

Writes
    <out-dir>/nano-sd15.safetensors  U-Net zero-padded to 320 wide + TAESD VAE, fp16, ComfyUI's
                                     single-file SD1.5 layout (``train.nano.sd15_format``), <= 60 MB
    <out-dir>/text-encoder/          CLIPTextModel (fp16) + CLIPTokenizer, ``save_pretrained``
                                     layout, <= 20 MB
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kosmosg_core.files import check_output_folder
from train.common.config import exit_on_input_error, parse_config
from train.nano import paths
from train.nano import text_encoder as te
from train.nano.sd15_format import write_sd15_checkpoint
from train.nano.train_unet import load_unet, trained_text_encoder
from train.nano.train_vae import load_vae

logger = logging.getLogger(__name__)

MAX_CHECKPOINT_MB = 60
MAX_TEXT_ENCODER_MB = 20


@dataclass
class ExportConfig:
    unet: str = field(default=paths.UNET_RUN, metadata={"help": "train_unet run folder or unet_ema.safetensors"})
    vae: str = field(default=paths.VAE_RUN, metadata={"help": "train_vae run folder or vae.safetensors"})
    text_encoder: str = field(default=paths.TEXT_ENCODER,
                              metadata={"help": "text encoder folder written by train_text_encoder"})
    out_dir: str = field(default=paths.MODELS, metadata={"help": "where nano-sd15.safetensors + text-encoder/ go"})


def folder_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def export(cfg: ExportConfig) -> dict:
    out = check_output_folder(cfg.out_dir, "--out-dir")
    unet = load_unet(cfg.unet)
    vae = load_vae(cfg.vae)
    text_model, tokenizer = te.load_text_encoder(cfg.text_encoder)
    trained_on, given = trained_text_encoder(cfg.unet), te.weights_fingerprint(text_model)
    if trained_on is None:
        logger.warning("%s does not record its text encoder; make sure it was trained on %s", cfg.unet, cfg.text_encoder)
    elif trained_on != given:
        raise ValueError(f"--unet {cfg.unet} was trained on another text encoder than --text-encoder "
                         f"{cfg.text_encoder} (fingerprint {trained_on} vs {given}); pass the text encoder of "
                         f"the U-Net's run (its train_config.json names it)")

    # written beside the shipped files and checked first: a failed export leaves them as they were
    staged_ckpt = write_sd15_checkpoint(
        out / (paths.SD15_FILE + ".new"), unet.to_padded_state_dict(), vae.taesd_encoder.state_dict(),
        vae.taesd_decoder.state_dict(), float(vae.vae_scale), float(vae.vae_shift), dtype=torch.float16,
        metadata={"nano_unet_config": json.dumps(unet.config.to_dict())},
    )
    text_dir = out / te.TEXT_SUBFOLDER
    staged_text = out / (te.TEXT_SUBFOLDER + ".new")
    shutil.rmtree(staged_text, ignore_errors=True)
    te.save_text_encoder(text_model, tokenizer, staged_text, dtype=torch.float16)
    sizes = {"checkpoint_mb": staged_ckpt.stat().st_size / 1e6, "text_encoder_mb": folder_megabytes(staged_text)}
    if sizes["checkpoint_mb"] > MAX_CHECKPOINT_MB or sizes["text_encoder_mb"] > MAX_TEXT_ENCODER_MB:
        staged_ckpt.unlink()
        shutil.rmtree(staged_text)
        raise ValueError(f"exported files exceed the shipping budget ({sizes}; limits {MAX_CHECKPOINT_MB} MB and "
                         f"{MAX_TEXT_ENCODER_MB} MB): train a narrower text encoder (--text-layers / "
                         f"--text-intermediate); {out} was left as it was")
    ckpt = out / paths.SD15_FILE
    os.replace(staged_ckpt, ckpt)
    shutil.rmtree(text_dir, ignore_errors=True)
    staged_text.rename(text_dir)
    logger.info("exported %s (%.1f MB) and %s (%.1f MB)", ckpt, sizes["checkpoint_mb"], text_dir,
                sizes["text_encoder_mb"])
    return {"checkpoint": str(ckpt), "text_encoder": str(text_dir), **sizes}


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = export(parse_config(ExportConfig, argv, description=__doc__.split("\n")[0]))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    exit_on_input_error(main)
