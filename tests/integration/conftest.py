"""Session fixtures for the real-ComfyUI tests: one server, tiny models, the pack as a custom node."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import comfy_server, comfy_tiny_models

REPO = Path(__file__).resolve().parents[2]
PACK_NAME = "ComfyUI-Kosmos-G"  # folder name under custom_nodes (what users clone into)
TINY_KOSMOSG_PT = "tiny-kosmosg.pt"
TINY_KOSMOSG = "tiny-kosmosg.safetensors"  # the .pt converted by the core (every test may use it first)
TINY_MODELS_CACHE = comfy_server.CACHE_DIR / f"tiny-sd15-models-v{comfy_tiny_models.VERSION}"


def _require_comfy():
    if not comfy_server.comfy_available():
        message = (f"real ComfyUI not installed at {comfy_server.COMFY_TREE} (run .ci/setup_env.sh)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _tiny_sd_models(models_dir: Path) -> None:
    """Generate (once per cache version) and link the tiny SD1.5 checkpoints (without and with CLIP), ControlNet and
    LoRA."""
    if not (TINY_MODELS_CACHE / "checkpoints" / comfy_tiny_models.CLIP_CHECKPOINT_NAME).is_file():  # written last
        TINY_MODELS_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(comfy_server.VENV_PYTHON), str(Path(comfy_tiny_models.__file__)),
                        "--comfy", str(comfy_server.COMFY_TREE), "--out", str(TINY_MODELS_CACHE), "--with-clip"],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    for sub, name in (("checkpoints", comfy_tiny_models.UNET_NAME),
                      ("checkpoints", comfy_tiny_models.CLIP_CHECKPOINT_NAME),
                      ("controlnet", comfy_tiny_models.CONTROLNET_NAME), ("loras", comfy_tiny_models.LORA_NAME)):
        target = models_dir / sub / name
        if not target.exists():
            target.symlink_to(TINY_MODELS_CACHE / sub / name)


def _tiny_kosmosg(kosmosg_dir: Path) -> None:
    """A tiny official-format checkpoint (fairseq .pt layout, 768-wide output) with its tokenizer
    folder (data/) and config sidecar beside it, as a user would unpack the official release, holding an SD1.5-type
    U-Net and VAE in float16 as the official file does (for Kosmos-G SD1.5 From Checkpoint: a U-Net ComfyUI detects
    as SD1.5, small, and SD1.5's own VAE); and its conversion to the pack's .safetensors in fp32 (what the Convert
    node writes: without them)."""
    import torch

    from kosmosg_core.checkpoint import convert_official
    from support.tiny_kosmosg import write_tiny_official
    from support.tiny_sd15 import comfy_detectable_sd15_networks, store_sd15_networks

    write_tiny_official(kosmosg_dir, context_dim=768, seed=0, name=TINY_KOSMOSG_PT)
    store_sd15_networks(kosmosg_dir / TINY_KOSMOSG_PT, *comfy_detectable_sd15_networks(), dtype=torch.float16)
    convert_official(kosmosg_dir / TINY_KOSMOSG_PT, kosmosg_dir / TINY_KOSMOSG, dtype=torch.float32)


def _subject_images(input_dir: Path) -> None:
    """The shipped example images (workflows/input/, as the start script copies them), then two
    drawn test subjects under the generic example names."""
    from PIL import Image, ImageDraw

    for image in (REPO / "workflows" / "input").glob("*.png"):
        shutil.copyfile(image, input_dir / image.name)
    for i, (background, shape) in enumerate([((200, 60, 40), (30, 90, 220)), ((40, 160, 90), (240, 220, 60))], 1):
        img = Image.new("RGB", (64, 64), background)
        draw = ImageDraw.Draw(img)
        draw.ellipse((12 + 4 * i, 10, 52, 50 - 4 * i), fill=shape)
        img.save(input_dir / f"kosmosg_subject_{i}.png")


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """A running ComfyUI 0.30.0 with the pack in custom_nodes and tiny models in DATA/models."""
    _require_comfy()
    data = comfy_server.prepare_data_dir(tmp_path_factory.mktemp("comfy-data"), REPO, PACK_NAME)
    _tiny_sd_models(data / "models")
    _tiny_kosmosg(data / "models" / "kosmosg")
    _subject_images(data / "input")
    server = comfy_server.ComfyServer(data, threads=1)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        if sys.exc_info()[0] is not None:
            print(server.log_tail())
