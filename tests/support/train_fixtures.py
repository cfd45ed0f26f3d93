"""Tiny, download-free fixtures for the train/ stage tests: dataset shards in the documented format
(written with train.data's own sample builders and shard writer), a tiny KosmosG config, a tiny
SD1.5-style CLIP text encoder + tokenizer, tiny diffusers / nano score models.

Every fixture is a pure function of its arguments (fixed seeds), so runs compare bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from support.tokenizer_fixture import build_tiny_tokenizer

CONTEXT_DIM = 32  # aligner width = CLIP hidden = U-Net cross-attention width in the fixtures
SUBJECTS = ["dog", "cat", "robot", "car", "bird", "teapot"]
COLOURS = {"dog": (200, 40, 40), "cat": (40, 200, 40), "robot": (40, 40, 200), "car": (200, 200, 40),
           "bird": (200, 40, 200), "teapot": (40, 200, 200)}
PLACES = ["the beach", "a wooden table", "the moon", "the city street"]


def tiny_tokenizer(root) -> Path:
    return build_tiny_tokenizer(Path(root) / "tokenizer")


def tiny_model_config(path, vocab_size: int):
    """A tiny KosmosGConfig JSON (aligner 32 wide) -> its path."""
    from kosmosg_core.config import KosmosGConfig

    cfg = KosmosGConfig.tiny(vocab_size=vocab_size, context_dim=CONTEXT_DIM)
    Path(path).write_text(cfg.to_json())
    return str(path)


def _picture(subject: str, index: int, size: int = 32) -> Image.Image:
    """A square of the subject's colour on a grey background, position varying with index."""
    canvas = np.full((size, size, 3), 128, dtype=np.uint8)
    offset = (index * 5) % (size // 2)
    canvas[offset:offset + size // 2, offset:offset + size // 2] = COLOURS[subject]
    return Image.fromarray(canvas)


def write_dataset(root, samples_per_shard: int = 4, count: int = 16, kinds=("laion", "openimage", "instructpix2pix")
                  ) -> str:
    """`count` samples cycling through `kinds`, in shards of `samples_per_shard` -> the folder."""
    from train.data.entities import layout_interleaved
    from train.data.samples import ip2p_sample, laion_sample, openimage_sample
    from train.data.shards import shard_name, write_shard

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(count):
        subject, place = SUBJECTS[i % len(SUBJECTS)], PLACES[i % len(PLACES)]
        kind = kinds[i % len(kinds)]
        key = f"{i:06d}_{kind}"
        target = _picture(subject, i)
        if kind == "laion":
            samples.append(laion_sample(key, f"a {subject} on {place}", target))
        elif kind == "openimage":
            caption = f"a {subject} sitting on {place}"
            layout = layout_interleaved(caption, [subject])
            crop = _picture(subject, 0)
            masked = Image.fromarray(np.where(np.asarray(crop) == 128, 255, np.asarray(crop)).astype(np.uint8))
            samples.append(openimage_sample(key, caption, layout, target, [(crop, masked)]))
        else:
            other = SUBJECTS[(i + 1) % len(SUBJECTS)]
            pairs = [(_picture(subject, i), _picture(other, i)), (_picture(subject, i + 1), _picture(other, i + 1))]
            samples.append(ip2p_sample(key, f"a {subject}", f"make it a {other}", pairs))
    for index in range(0, count, samples_per_shard):
        write_shard(str(root / shard_name("shard", index // samples_per_shard)), samples[index:index + samples_per_shard])
    return str(root)


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE (GPT-2 / CLIP) uses for bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def write_clip_text(root, hidden: int = CONTEXT_DIM, seed: int = 0) -> str:
    """A tiny CLIPTextModel + CLIPTokenizer (character-level BPE, no merges) saved like an SD1.5 folder's parts."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    chars = _byte_level_alphabet()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])
    tokenizer.save_pretrained(str(root / "tokenizer"))
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokens), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=len(tokens) - 2, eos_token_id=len(tokens) - 1, pad_token_id=len(tokens) - 1)
    CLIPTextModel(config).save_pretrained(str(root / "text_encoder"))
    return str(root)


def write_diffusers_score_model(root, context_dim: int = CONTEXT_DIM, seed: int = 0) -> str:
    """A tiny SD1.5-shaped diffusers folder: unet/ (cross-attention `context_dim`), vae/ (2x down), scheduler/."""
    from .tiny_sd15 import write_tiny_sd15

    return write_tiny_sd15(root, context_dim, seed)


def write_nano_score_model(path, context_dim: int = CONTEXT_DIM, seed: int = 0) -> str:
    """The nano single-file layout (train.nano.sd15_format) at fixture size: 16 real of 64 padded
    channels and a `context_dim`-wide context (the shipped nano model is 320 / 768)."""
    from safetensors.torch import save_file

    from train.nano.sd15_format import DECODER_PREFIX, ENCODER_PREFIX, FORMAT_NAME, FORMAT_VERSION, UNET_PREFIX, \
        VAE_PREFIX
    from train.nano.taesd import TinyAutoencoder
    from train.nano.unet import NanoUNet, NanoUNetConfig

    torch.manual_seed(seed)
    cfg = NanoUNetConfig(real_channels=16, padded_channels=64, num_heads=8, context_dim=context_dim)
    unet = NanoUNet(cfg)
    unet.reset_parameters(zero_init_residual=False)  # a random, non-trivial network
    autoencoder = TinyAutoencoder()
    tensors = {UNET_PREFIX + k: v for k, v in unet.to_padded_state_dict().items()}
    tensors.update({ENCODER_PREFIX + k: v for k, v in autoencoder.taesd_encoder.state_dict().items()})
    tensors.update({DECODER_PREFIX + k: v for k, v in autoencoder.taesd_decoder.state_dict().items()})
    tensors[VAE_PREFIX + "vae_scale"] = torch.tensor(1.0)
    tensors[VAE_PREFIX + "vae_shift"] = torch.tensor(0.0)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                        "nano_unet_config": json.dumps(cfg.to_dict())})
    return str(path)


def subprocess_env() -> dict:
    """Environment for training subprocesses: 1 thread, the repo and tests/ importable."""
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(repo), str(repo / "tests")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])))
    return env


def make_env(root):
    """Every fixture under `root` -> a namespace of paths (tokenizer, model_config, data, clip, sd, nano)."""
    import types

    from kosmosg_core.tokenizer import KosmosGTokenizer

    root = Path(root)
    tokenizer = tiny_tokenizer(root)
    vocab = KosmosGTokenizer.from_dir(tokenizer).vocab_size
    return types.SimpleNamespace(
        root=root, tokenizer=str(tokenizer), model_config=tiny_model_config(root / "model.json", vocab),
        data=write_dataset(root / "data"), clip=write_clip_text(root / "clip"),
        sd=write_diffusers_score_model(root / "sd"), nano=write_nano_score_model(root / "nano.safetensors"))


def common_args(env, out, steps: int = 30, batch: int = 4, save_every: int = 10) -> list[str]:
    return ["--data", env.data, "--tokenizer", env.tokenizer, "--model-config", env.model_config,
            "--output-dir", str(out), "--batch-size", str(batch), "--max-steps", str(steps),
            "--save-every", str(save_every), "--warmup-steps", "3", "--tensorboard", "false", "--progress", "false"]


def launch_command(module: str, args: list[str], nproc: int = 2, launcher: str = "torchrun") -> list[str]:
    """The command running `python -m module args` as `nproc` CPU processes (gloo): torchrun (a free
    port each time) or `accelerate launch --multi_gpu` (CPU processes on a machine without a GPU)."""
    tool = Path(sys.executable).with_name(launcher)
    if launcher == "torchrun":
        return [str(tool), "--standalone", "--nproc_per_node", str(nproc), "-m", module] + args
    from support.comfy_server import free_port

    port = free_port()  # accelerate has no free-port option: one the OS just handed out
    return [str(tool), "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m", module] + args


def launch_processes(module: str, args: list[str], nproc: int = 2, launcher: str = "torchrun") -> None:
    """Run `launch_command(...)` to the end; it must succeed."""
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(launch_command(module, args, nproc, launcher), cwd=repo, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def assert_same_training(reference, run, loss_rtol: float = 1e-5, weight_atol: float = 1e-5) -> None:
    """Two run folders logged the same losses, gradient norms and LRs, and hold the same weights and
    optimiser state (whatever process counts or sharding wrote them)."""
    import pytest

    from train.common.checkpointing import load_checkpoint
    from train.common.metrics import read_metrics

    ref_metrics, run_metrics = read_metrics(reference), read_metrics(run)
    assert [m["step"] for m in run_metrics] == [m["step"] for m in ref_metrics]
    for a, b in zip(ref_metrics, run_metrics):
        assert b["loss"] == pytest.approx(a["loss"], rel=loss_rtol, abs=1e-6), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=10 * loss_rtol), (a, b)
        assert b["lr"] == a["lr"]
    ref, got = load_checkpoint(reference), load_checkpoint(run)
    assert ref["step"] == got["step"] and set(ref["model"]) == set(got["model"])
    for name, tensor in ref["model"].items():
        assert type(got["model"][name]) is torch.Tensor, name  # whole tensors, not shards
        assert torch.allclose(tensor, got["model"][name], rtol=10 * loss_rtol, atol=weight_atol), name
    assert set(ref["optimizer"]["state"]) == set(got["optimizer"]["state"])  # same parameter indices
    for index, moments in ref["optimizer"]["state"].items():
        for key, value in moments.items():
            other = got["optimizer"]["state"][index][key]
            assert torch.allclose(value, other, rtol=1e-3, atol=weight_atol), (index, key)


def run_stage1_in_process(args: list[str], crash_at: int | None = None) -> list[int]:
    """`python -m train.stage1 args` in this process, optionally raising KeyboardInterrupt after
    update `crash_at` (a crash after its metrics are logged) -> the updates that ran."""
    from train.common.config import parse_config
    from train.loop import run_training
    from train.stage1 import Stage1, Stage1Config

    cfg = parse_config(Stage1Config, args)
    steps_run = []

    def on_step(step, metrics):
        steps_run.append(step)
        if step == crash_at:
            raise KeyboardInterrupt("simulated crash")

    run_training(Stage1(cfg), cfg, on_step=on_step)
    return steps_run
