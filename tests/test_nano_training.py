"""Nano training commands (issue 8 point 3): tokenizer, sampler, a few steps of each command on a tiny
config, exact resume after SIGKILL, refusal of corrupt / mismatched checkpoints, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from support.argv import with_flags
from train.nano import sampler
from train.nano import text_encoder as te
from train.nano.nano_data import world_vocabulary
from train.common.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]

TE_ARGS = ["--num-scenes", "48", "--eval-scenes", "8", "--batch-size", "8", "--text-layers", "1",
           "--text-intermediate", "64", "--vision-width", "32", "--vision-layers", "1", "--vision-heads", "2",
           "--embed-dim", "16", "--eval-every", "3", "--shape-negatives", "4",
           "--attribute-weight", "1.0"]
VAE_ARGS = ["--num-scenes", "16", "--eval-scenes", "4", "--fit-scenes", "8", "--batch-size", "2", "--crop-size",
            "16", "--eval-every", "3"]


def unet_args(parts: dict) -> list[str]:
    return ["--text-encoder", str(parts["te"]), "--vae", str(parts["vae"]), "--num-scenes", "24",
            "--real-channels", "16", "--batch-size", "4", "--warmup-steps", "2", "--uncond-prob", "0.5"]


def run_command(module: str, args: list[str]):
    import importlib

    return importlib.import_module(f"train.nano.{module}").main(args)


def subprocess_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    """A tiny trained text encoder and VAE (the U-Net's inputs)."""
    root = tmp_path_factory.mktemp("nano_parts")
    run_command("train_text_encoder", TE_ARGS + ["--output-dir", str(root / "te"), "--max-steps", "2"])
    run_command("train_vae", VAE_ARGS + ["--output-dir", str(root / "vae"), "--max-steps", "2"])
    return {"root": root, "te": root / "te" / te.TEXT_SUBFOLDER, "vae": root / "vae"}


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_makes_each_world_word_one_token_and_pads_like_sd15(tmp_path):
    words = world_vocabulary()
    tok = te.load_tokenizer(te.write_tokenizer_files(words, tmp_path))
    caption = "a red triangle on the left and an orange cross in the centre, on beige"
    ids = te.tokenize(tok, [caption, ""])
    assert ids.shape == (2, 77)
    tokens = tok.convert_ids_to_tokens(ids[0].tolist())
    n_words = len(caption.replace(",", " ,").split())
    assert tokens[0] == te.BOS_TOKEN and tokens[n_words + 1] == te.EOS_TOKEN
    assert [t.removesuffix("</w>") for t in tokens[1:n_words + 1]] == caption.replace(",", " ,").split()
    assert all(t == te.EOS_TOKEN for t in tokens[n_words + 1:])  # SD1.5 pads with the end token
    empty = ids[1].tolist()
    assert empty[0] == tok.bos_token_id and set(empty[1:]) == {tok.eos_token_id}
    assert len(set(ids[0, : n_words + 2].tolist())) > 8
    # an unknown word still tokenizes (into byte symbols), it is not dropped
    assert len(tok("zebra")["input_ids"]) > 3


def test_trim_to_longest_is_exact_for_the_causal_text_model(tmp_path):
    tok = te.load_tokenizer(te.write_tokenizer_files(world_vocabulary(), tmp_path))
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    model = CLIPTextModel(te.text_config(tok, layers=1, intermediate=64, heads=12)).eval()
    ids = te.tokenize(tok, ["a red circle on the left, on grey", "a blue square in the centre and a green cross on the "
                            "right, on white"])
    trimmed = te.trim_to_longest(ids, tok.eos_token_id)
    assert trimmed.shape[1] < 30
    with torch.no_grad():
        full, short = model(input_ids=ids), model(input_ids=trimmed)
    assert torch.allclose(full.last_hidden_state[:, : trimmed.shape[1]], short.last_hidden_state, atol=1e-5)
    assert torch.allclose(full.pooler_output, short.pooler_output, atol=1e-5)


# ----------------------------------------------------------------------------- sampler


def _oracle(x0: torch.Tensor, alphas: torch.Tensor):
    """The exact eps-predictor for data that is the single point x0."""
    def eps(x, t, context):
        a = alphas[t].float()[:, None, None, None]
        target = x0.repeat(x.shape[0] // x0.shape[0], 1, 1, 1)  # cond and uncond halves under CFG
        return (x - a.sqrt() * target) / (1 - a).sqrt()
    return eps


@pytest.mark.parametrize("method", sampler.METHODS)
def test_sampler_recovers_the_data_point_of_an_exact_model(method):
    alphas = sampler.sd15_alphas_cumprod()
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    context = torch.zeros(2, 77, 768)
    out = sampler.sample(_oracle(x0, alphas), context, torch.zeros(1, 77, 768), steps=10, guidance=5.0, seed=1,
                         method=method)
    assert torch.allclose(out, x0, atol=1e-3), (out - x0).abs().max()


def test_sampler_is_deterministic_by_seed_and_applies_guidance():
    torch.manual_seed(0)
    calls = []

    def unet(x, t, context):  # depends on the context, so guidance changes the result
        calls.append(x.shape[0])
        return 0.1 * x + context[:, :1, :4].mean(-1, keepdim=True)[..., None].expand_as(x)

    cond, uncond = torch.ones(3, 77, 768), torch.zeros(1, 77, 768)
    a = sampler.sample(unet, cond, uncond, steps=4, guidance=3.0, seed=5)
    b = sampler.sample(unet, cond, uncond, steps=4, guidance=3.0, seed=5)
    c = sampler.sample(unet, cond, uncond, steps=4, guidance=3.0, seed=6)
    d = sampler.sample(unet, cond, uncond, steps=4, guidance=1.0, seed=5)
    assert torch.equal(a, b) and not torch.allclose(a, c) and not torch.allclose(a, d)
    assert calls[0] == 6  # cond and uncond in one batched call
    with pytest.raises(ValueError, match="method"):
        sampler.sample(unet, cond, uncond, method="plms")


def test_add_noise_uses_sd15_schedule():
    alphas = sampler.sd15_alphas_cumprod()
    assert alphas.shape == (1000,)
    assert abs(alphas[0].item() - (1 - 0.00085)) < 1e-9
    assert abs(alphas[-1].item() - 0.0047) < 2e-4  # SD1.5's final alpha_bar
    x, n = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    assert torch.allclose(sampler.add_noise(x, n, torch.tensor([999]), alphas.float()), alphas[999].sqrt().float() * x)


# ----------------------------------------------------------------------------- text encoder: shape negatives


def test_shape_swapped_changes_one_shape_and_stays_in_the_train_split():
    from train.nano import world
    from train.nano.train_text_encoder import shape_swapped

    specs = [world.spec_at(world.TRAIN_SEED, i) for i in range(40)]
    swapped = shape_swapped(specs, torch.Generator().manual_seed(0))
    assert swapped == shape_swapped(specs, torch.Generator().manual_seed(0))  # deterministic by generator
    assert sum(s is not None for s in swapped) >= 36
    for spec, new in zip(specs, swapped):
        if new is None:
            continue
        changed = [(a, b) for a, b in zip(spec.subjects, new.subjects) if a != b]
        assert len(changed) == 1
        a, b = changed[0]
        assert a.shape != b.shape and (a.colour, a.position, a.size, a.cx, a.cy) == (b.colour, b.position, b.size, b.cx, b.cy)
        assert world.split_of(new) == "train" and new.background == spec.background


def test_attribute_labels_and_loss_read_each_subject_slot():
    from train.nano import world
    from train.nano.train_text_encoder import ATTRIBUTE_VALUES, attribute_labels, attribute_loss

    one = world.make_spec(np.random.default_rng(0), [("red", "circle", "left")], "grey")
    two = world.make_spec(np.random.default_rng(1), [("blue", "cross", "left"), ("green", "square", "right")], "white")
    labels = attribute_labels([one, two])
    none = [len(v) for v in ATTRIBUTE_VALUES]
    assert labels[0].tolist() == [world.COLOURS.index("red"), world.SHAPES.index("circle"), 0, *none]
    assert labels[1].tolist() == [world.COLOURS.index("blue"), world.SHAPES.index("cross"), 0,
                                  world.COLOURS.index("green"), world.SHAPES.index("square"), 2]
    # a head whose logits are the labels' one-hots (scaled) has ~zero loss; a shuffled one does not
    sizes = [len(v) + 1 for v in ATTRIBUTE_VALUES] * 2
    onehots = torch.cat([torch.nn.functional.one_hot(labels[:, k], n) for k, n in enumerate(sizes)], dim=1).float()
    head = torch.nn.Linear(2, onehots.shape[1], bias=False)
    with torch.no_grad():
        head.weight.copy_(50 * onehots.T)
    assert attribute_loss(head, torch.eye(2), labels) < 1e-6
    assert attribute_loss(head, torch.eye(2).flip(0), labels) > 10


class _CaptionOracle(torch.nn.Module):
    """Embeds an image as its scene's caption and a caption as itself (one-hot over a vocabulary of
    captions), optionally blind to shape words: a stand-in for the contrastive pair."""

    def __init__(self, tokenizer, specs, blind_to_shape: bool):
        super().__init__()
        from train.nano import world

        self.tokenizer, self.specs, self.blind = tokenizer, specs, blind_to_shape
        self.shapes = world.SHAPES
        self.index: dict[str, int] = {}

    def _key(self, caption: str) -> int:
        if self.blind:
            for shape in self.shapes:
                caption = caption.replace(shape, "thing")
        return self.index.setdefault(caption, len(self.index))

    def embed_text(self, ids):
        captions = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return torch.nn.functional.one_hot(torch.tensor([self._key(c.replace(" ,", ",")) for c in captions]), 4096).float()

    def embed_images(self, pixels):
        from train.nano import world

        return torch.nn.functional.one_hot(torch.tensor([self._key(world.caption_of(s)) for s in self.specs]), 4096).float()


@pytest.mark.parametrize("blind", [False, True])
def test_attribute_swap_accuracy_tells_a_shape_reader_from_a_shape_blind_pair(blind, parts):
    from train.nano import nano_data
    from train.nano.train_text_encoder import attribute_swap_accuracy

    tokenizer = te.load_tokenizer(parts["te"])
    scenes = nano_data.load_scenes("heldout", 12)
    oracle = _CaptionOracle(tokenizer, scenes.specs, blind_to_shape=blind)
    assert attribute_swap_accuracy(oracle, tokenizer, scenes.specs, scenes.images, "shape") == (0.0 if blind else 1.0)
    assert attribute_swap_accuracy(oracle, tokenizer, scenes.specs, scenes.images, "colour") == 1.0


# ----------------------------------------------------------------------------- commands: steps, resume, refusal


def _kill_midway(module: str, args: list[str], out: Path, kill_after_step: int) -> None:
    """Run the command in a subprocess and SIGKILL it once its metrics pass ``kill_after_step``."""
    process = subprocess.Popen([sys.executable, "-m", f"train.nano.{module}"] + args, cwd=REPO,
                               env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            try:
                metrics = read_metrics(out)
            except ValueError:  # a line read while it was being written: look again
                continue
            if metrics and metrics[-1].get("step", 0) >= kill_after_step:
                break
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed; raise max-steps"


def _assert_same_state(reference: Path, resumed: Path, steps: int) -> None:
    from train.common.checkpointing import load_checkpoint

    ref = [m for m in read_metrics(reference) if "loss" in m]
    res = [m for m in read_metrics(resumed) if "loss" in m]
    assert [m["step"] for m in res] == list(range(1, steps + 1))
    for a, b in zip(ref, res):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
    ref_state, res_state = load_checkpoint(reference), load_checkpoint(resumed)
    assert ref_state["step"] == res_state["step"] == steps
    for name, tensor in ref_state["model"].items():
        assert torch.allclose(tensor, res_state["model"][name], rtol=0, atol=1e-6), name


@pytest.mark.parametrize("module", ["train_text_encoder", "train_vae", "train_unet"])
def test_command_resumes_after_sigkill_to_the_uninterrupted_state(module, parts, tmp_path):
    steps = 8
    base = {"train_text_encoder": TE_ARGS, "train_vae": VAE_ARGS, "train_unet": unet_args(parts)}[module]
    base = base + ["--max-steps", str(steps), "--save-every", "3"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_command(module, base + ["--output-dir", str(reference)])
    _kill_midway(module, base + ["--output-dir", str(killed)], killed, kill_after_step=4)
    assert any(m["step"] >= 4 for m in read_metrics(killed))
    run_command(module, base + ["--output-dir", str(killed)])  # resumes from the step-3 (or 6) checkpoint
    _assert_same_state(reference, killed, steps)


@pytest.mark.parametrize("module", ["train_text_encoder", "train_vae", "train_unet"])
def test_command_refuses_a_corrupt_checkpoint(module, parts, tmp_path):
    base = {"train_text_encoder": TE_ARGS, "train_vae": VAE_ARGS, "train_unet": unet_args(parts)}[module]
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a zip" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        run_command(module, base + ["--output-dir", str(out), "--max-steps", "2"])


def test_rerunning_a_finished_vae_run_keeps_one_final_line(tmp_path):
    args = VAE_ARGS + ["--output-dir", str(tmp_path / "vae"), "--max-steps", "2"]
    for _ in range(3):  # e.g. a kill after the last line, then the same command again
        run_command("train_vae", args)
    assert sum("vae_scale" in m for m in read_metrics(tmp_path / "vae")) == 1
    # from a review: an extended run kept the first end's line and never logged the values its file holds
    run_command("train_vae", args[:-1] + ["4"])
    finals = [m for m in read_metrics(tmp_path / "vae") if "vae_scale" in m]
    assert [m["step"] for m in finals] == [2, 4]


def test_unet_refuses_latents_cached_from_another_vae(parts, tmp_path):
    """From a review: a new run into a folder whose checkpoint was deleted (what the corrupt-checkpoint message
    advises) reused the cached latents of the earlier run's VAE."""
    import shutil

    out = tmp_path / "unet"
    run_command("train_unet", unet_args(parts) + ["--output-dir", str(out), "--max-steps", "1", "--save-every", "1"])
    (out / "checkpoint.pt").unlink()
    other_vae = shutil.copytree(parts["vae"], tmp_path / "other-vae")  # a training folder, vae.safetensors in it
    with open(other_vae / "vae.safetensors", "r+b") as f:  # other weights, the same layout
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x3f")
    args = unet_args(parts)
    args[args.index("--vae") + 1] = str(other_vae)
    with pytest.raises(ValueError, match="holds latents of another VAE than --vae"):
        run_command("train_unet", args + ["--output-dir", str(out), "--max-steps", "1", "--save-every", "1"])


def test_unet_and_text_encoder_refuse_a_checkpoint_of_another_architecture(parts, tmp_path):
    out = tmp_path / "unet"
    args = unet_args(parts) + ["--output-dir", str(out), "--max-steps", "1", "--save-every", "1"]
    run_command("train_unet", args)
    with pytest.raises(ValueError, match="real_channels|does not match"):
        run_command("train_unet", with_flags(args, "--real-channels", "24", "--max-steps", "2"))
    te_out = tmp_path / "te"
    te_args = TE_ARGS + ["--output-dir", str(te_out), "--max-steps", "1"]
    run_command("train_text_encoder", te_args)
    with pytest.raises(ValueError, match="text_layers|does not match"):
        run_command("train_text_encoder", with_flags(te_args, "--text-layers", "2", "--max-steps", "2"))


def test_resume_refuses_changed_settings_and_keeps_the_run_record(parts, tmp_path):
    out = tmp_path / "unet"
    args = unet_args(parts) + ["--output-dir", str(out), "--max-steps", "1", "--save-every", "1"]
    run_command("train_unet", args)
    record = (out / "train_config.json").read_text()
    with pytest.raises(ValueError, match=r"other settings than this run's: learning_rate .* -> 0.1; seed 0 -> 5"):
        run_command("train_unet", with_flags(args, "--max-steps", "2", "--learning-rate", "0.1", "--seed", "5"))
    assert (out / "train_config.json").read_text() == record
    run_command("train_unet", with_flags(args, "--max-steps", "2", "--eval-every", "0"))  # the length may change
    for flag, value, least in (("--save-every", "0", 1), ("--batch-size", "0", 1), ("--warmup-steps", "-5", 0)):
        with pytest.raises(ValueError, match=f"{flag} {value}: must be at least {least}"):
            run_command("train_unet", with_flags(args, "--output-dir", str(tmp_path / "zero"), flag, value))
    with pytest.raises(ValueError, match="is at step 2, beyond --max-steps 1"):  # it rewrote the EMA as step 1
        run_command("train_unet", args)


def test_unet_is_tied_to_its_text_encoder_on_resume_and_export(parts, tmp_path):
    from train.nano import export_nano
    from train.nano.train_unet import trained_text_encoder

    other = tmp_path / "other-te"
    run_command("train_text_encoder", TE_ARGS + ["--output-dir", str(other), "--max-steps", "2", "--seed", "1"])
    other_te = other / te.TEXT_SUBFOLDER
    out = tmp_path / "unet"
    args = unet_args(parts) + ["--output-dir", str(out), "--max-steps", "1", "--save-every", "1"]
    run_command("train_unet", args)
    expected = te.weights_fingerprint(te.load_text_encoder(parts["te"])[0])
    assert trained_text_encoder(out) == expected != te.weights_fingerprint(te.load_text_encoder(other_te)[0])

    with pytest.raises(ValueError, match="another text encoder"):  # the cached embeddings are the old encoder's
        run_command("train_unet", with_flags(args, "--text-encoder", str(other_te), "--max-steps", "2"))
    with pytest.raises(ValueError, match="--unet .*another text encoder"):
        export_nano.export(export_nano.ExportConfig(unet=str(out), vae=str(parts["vae"]), text_encoder=str(other_te),
                                                    out_dir=str(tmp_path / "models")))
    assert not (tmp_path / "models").exists()



def test_an_export_over_budget_leaves_the_shipped_files_alone(parts, tmp_path, monkeypatch):
    from train.nano import export_nano

    out = tmp_path / "unet"
    run_command("train_unet", unet_args(parts) + ["--output-dir", str(out), "--max-steps", "1", "--save-every", "1"])
    shipped = tmp_path / "models"
    config = export_nano.ExportConfig(unet=str(out), vae=str(parts["vae"]), text_encoder=str(parts["te"]),
                                      out_dir=str(shipped))
    export_nano.export(config)
    before = {p.relative_to(shipped): p.read_bytes() for p in shipped.rglob("*") if p.is_file()}
    monkeypatch.setattr(export_nano, "MAX_TEXT_ENCODER_MB", 0.001)
    with pytest.raises(ValueError, match="shipping budget .* was left as it was"):
        export_nano.export(config)
    assert {p.relative_to(shipped): p.read_bytes() for p in shipped.rglob("*") if p.is_file()} == before


def test_unet_run_logs_judged_evaluation(parts, tmp_path):
    out = tmp_path / "unet"
    run_command("train_unet", unet_args(parts) + ["--output-dir", str(out), "--max-steps", "2", "--eval-every", "2",
                                                  "--eval-samples", "4", "--eval-steps", "2"])
    last = read_metrics(out)[-1]
    for key in ("eval_single", "eval_two", "eval_single_colour", "eval_two_position"):
        assert 0.0 <= last[key] <= 1.0
    assert (out / "unet_ema.safetensors").is_file() and (out / "cache.safetensors").is_file()


def test_config_file_and_flag_override(parts, tmp_path):
    config = tmp_path / "vae.yaml"
    config.write_text("max_steps: 5\nbatch_size: 2\ncrop_size: 16\nnum_scenes: 8\neval_scenes: 2\nfit_scenes: 4\n")
    out = tmp_path / "vae"
    run_command("train_vae", ["--config", str(config), "--max-steps", "1", "--output-dir", str(out)])
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["max_steps"] == 1 and saved["batch_size"] == 2 and saved["crop_size"] == 16
    with pytest.raises(ValueError, match="crop_size"):
        run_command("train_vae", ["--config", str(config), "--crop-size", "12", "--output-dir", str(tmp_path / "x")])


def test_help_of_every_command():
    for module in ("train_text_encoder", "train_vae", "train_unet", "export_nano"):
        result = subprocess.run([sys.executable, "-m", f"train.nano.{module}", "--help"], cwd=REPO,
                                env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert ("--out-dir" if module == "export_nano" else "--output-dir") in result.stdout
        assert "--config" in result.stdout


# ----------------------------------------------------------------------------- export


def test_export_writes_loadable_sd15_checkpoint_and_text_encoder(parts, tmp_path):
    from transformers import CLIPTextModel

    from train.nano import export_nano
    from train.nano.sd15_format import read_sd15_checkpoint
    from train.nano.train_unet import load_unet
    from train.nano.train_vae import load_vae
    from train.nano.unet import NanoUNet

    unet_dir = tmp_path / "unet"
    run_command("train_unet", unet_args(parts) + ["--output-dir", str(unet_dir), "--max-steps", "2"])
    result = export_nano.main(["--unet", str(unet_dir), "--vae", str(parts["vae"]), "--text-encoder",
                               str(parts["te"]), "--out-dir", str(tmp_path / "models")])
    assert result["checkpoint_mb"] <= 60 and result["text_encoder_mb"] <= 20

    saved = read_sd15_checkpoint(result["checkpoint"])
    assert saved["unet"]["input_blocks.0.0.weight"].shape[0] == 320
    assert all(v.dtype == torch.float16 for v in saved["unet"].values())
    narrow = load_unet(unet_dir)
    back = NanoUNet.from_padded_state_dict({k: v.float() for k, v in saved["unet"].items()}, narrow.config)
    for name, tensor in narrow.state_dict().items():
        assert torch.allclose(back.state_dict()[name], tensor, atol=1e-3, rtol=1e-2), name
    vae = load_vae(parts["vae"])
    assert abs(saved["vae_scale"] - float(vae.vae_scale)) < 1e-3 * float(vae.vae_scale)

    text_dir = Path(result["text_encoder"])
    model = CLIPTextModel.from_pretrained(str(text_dir))
    tok = te.load_tokenizer(text_dir)
    assert (text_dir / "vocab.json").is_file() and (text_dir / "merges.txt").is_file()
    hidden = te.encode_captions(model.float(), tok, ["a red circle on the left, on grey"])
    assert hidden.shape == (1, 77, 768) and torch.isfinite(hidden).all()
    original, _ = te.load_text_encoder(parts["te"])
    assert torch.allclose(hidden, te.encode_captions(original, tok, ["a red circle on the left, on grey"]), atol=1e-2)


def test_vae_decoder_finetune_keeps_the_encoder_and_latent_mapping(parts, tmp_path):
    from safetensors.torch import load_file

    from train.nano.train_vae import VAE_FILE

    out = tmp_path / "decoder"
    run_command("train_vae", with_flags(VAE_ARGS, "--output-dir", str(out), "--max-steps", "3", "--init-vae",
                                        str(parts["vae"]), "--freeze-encoder", "true", "--crop-size", "64"))
    init, tuned = load_file(str(parts["vae"] / VAE_FILE)), load_file(str(out / VAE_FILE))
    for name, tensor in init.items():
        if name.startswith("taesd_encoder.") or name in ("vae_scale", "vae_shift"):
            assert torch.equal(tensor, tuned[name]), name  # the U-Net's latent space is unchanged
    assert any(not torch.equal(init[n], tuned[n]) for n in init if n.startswith("taesd_decoder."))
    with pytest.raises(ValueError, match="--freeze-encoder needs --init-vae"):
        run_command("train_vae", VAE_ARGS + ["--output-dir", str(tmp_path / "bad"), "--max-steps", "1",
                                             "--freeze-encoder", "true"])


def test_the_wrong_kind_of_model_file_is_named_briefly(tmp_path):
    from train.nano.train_unet import load_unet
    from train.nano.train_vae import load_vae

    shipped = REPO / "models" / "nano" / "nano-sd15.safetensors"  # the exported SD1.5 layout, not a train_unet file
    with pytest.raises(ValueError, match=r"is not a nano U-Net .* tensors missing") as error:
        load_unet(shipped)
    assert len(str(error.value)) < 1000
    with pytest.raises(ValueError, match=r"is not a TAESD state dict .* unexpected"):
        load_vae(shipped)
    text = tmp_path / "notes.safetensors"
    text.write_text("not tensors")
    with pytest.raises(ValueError, match="is not a readable .safetensors file"):
        load_unet(text)


def test_text_encoder_folder_with_weights_transformers_cannot_place_is_refused(parts, tmp_path):
    """A folder whose tensor names this transformers does not expect (another major version's layout, or a
    damaged save) is an error naming it, not a text encoder that is random where the names did not match."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "te"
    shutil.copytree(parts["te"], folder)
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    save_file({f"renamed.{name}": tensor for name, tensor in state.items()}, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"finds no weights for \d+ of the text encoder's tensors"):
        te.load_text_encoder(folder)
    assert te.load_text_encoder(parts["te"])[0].training is False  # the intact folder loads, in eval mode


def test_nano_lr_schedule_warms_up_then_decays_to_a_tenth():
    from train.nano.run_utils import warmup_cosine

    cosine, constant = warmup_cosine(2, 10), warmup_cosine(2, 10, constant=True)
    assert [cosine(s) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert cosine(6) == pytest.approx(0.55) and cosine(10) == pytest.approx(0.1) == cosine(50)
    assert [constant(s) for s in (0, 1, 2, 10, 50)] == [0.5, 1.0, 1.0, 1.0, 1.0]


def test_nano_unet_refuses_an_unknown_lr_schedule_before_writing(tmp_path):
    import dataclasses

    from train.nano.train_unet import UNetTrainConfig, train

    cfg = dataclasses.replace(UNetTrainConfig(), output_dir=str(tmp_path / "run"), lr_schedule="linear")
    with pytest.raises(ValueError, match="--lr-schedule 'linear': use one of constant, cosine"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_sampling_timesteps_run_evenly_from_999_down_to_0():
    """Descending, evenly spaced, first 999 and last 0 (the sampler ends on the clean latent)."""
    assert sampler.sampling_timesteps(1) == [999]
    assert sampler.sampling_timesteps(2) == [999, 0]
    assert sampler.sampling_timesteps(4) == [999, 666, 333, 0]
    with pytest.raises(ValueError, match="steps"):
        sampler.sampling_timesteps(0)


def test_guided_eps_is_uncond_plus_guidance_times_the_difference():
    """eps = eps_uncond + g * (eps_cond - eps_uncond), with the conditional half from ``context``."""
    def unet(x, t, context):  # eps = the context's first entry, broadcast: cond 2, uncond 0.5
        return context[:, :1, :1, None].expand_as(x)

    x = torch.zeros(1, 4, 2, 2)
    cond, uncond = torch.full((1, 77, 768), 2.0), torch.full((1, 77, 768), 0.5)
    eps = sampler.guided_eps(unet, x, 500, cond, uncond, guidance=3.0)
    assert torch.allclose(eps, torch.full_like(x, 0.5 + 3.0 * (2.0 - 0.5)))
    assert torch.allclose(sampler.guided_eps(unet, x, 500, cond, uncond, guidance=1.0), torch.full_like(x, 2.0))


@pytest.mark.parametrize("method", sampler.METHODS)
def test_a_zero_eps_model_returns_the_seeded_noise_scaled_to_the_first_step(method):
    """With eps = 0 every step keeps x0 = x / sqrt(a_999): both samplers return the seed's initial noise
    (torch.Generator().manual_seed(seed)) times 1 / sqrt(alpha_bar_999) = sqrt(1 + sigma_max^2)."""
    alphas = sampler.sd15_alphas_cumprod()
    context = torch.zeros(2, 77, 768)
    out = sampler.sample(lambda x, t, c: torch.zeros_like(x), context, None, steps=5, seed=7, method=method)
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    assert torch.allclose(out, noise / alphas[999].sqrt().float(), rtol=1e-4, atol=1e-4)


def test_add_noise_scales_the_noise_by_sqrt_one_minus_alpha_bar():
    alphas = sampler.sd15_alphas_cumprod().float()
    x, n = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)  # [B, C, H, W]
    t = torch.tensor([0, 500])
    noisy = sampler.add_noise(x, n, t, alphas)
    assert torch.allclose(noisy[0], torch.full((4, 2, 2), (1 - alphas[0]).sqrt().item()))
    assert torch.allclose(noisy[1], torch.full((4, 2, 2), (1 - alphas[500]).sqrt().item()))


def test_step_generator_draws_differ_by_step_and_seed():
    """Every (seed, step) gets its own stream: no step repeats another's batch, and seed s + 1 is not
    seed s shifted by a step."""
    from train.nano.run_utils import step_generator

    draws = {(seed, step): tuple(torch.randint(0, 2**31 - 1, (4,), generator=step_generator(seed, step)).tolist())
             for seed in range(3) for step in range(40)}
    assert len(set(draws.values())) == len(draws)
    assert torch.equal(torch.rand(3, generator=step_generator(2, 5)), torch.rand(3, generator=step_generator(2, 5)))


def test_ema_update_moves_a_fraction_one_minus_decay_towards_the_model():
    """ema <- decay * ema + (1 - decay) * model."""
    from train.nano.run_utils import ema_update_into

    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(1.0)
        for p in model.parameters():
            p.fill_(3.0)
    ema_update_into(ema, model, 0.9)
    for p in ema.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.9 * 1.0 + 0.1 * 3.0))


def test_diffusion_loss_targets_the_noise_not_the_latents():
    """Epsilon prediction: a model that predicts 0 has loss E[eps^2] ~ 1 whatever the latents are."""
    from train.nano.train_unet import diffusion_loss

    latents = torch.full((64, 4, 8, 8), 3.0)  # [B, 4, 8, 8]
    loss = diffusion_loss(lambda x, t, c: torch.zeros_like(x), latents, torch.zeros(64, 77, 768),
                          torch.Generator().manual_seed(0), sampler.sd15_alphas_cumprod().float())
    assert abs(loss.item() - 1.0) < 0.05


def test_reconstruction_loss_with_uniform_weight_is_the_plain_mse():
    """Weighted MSE normalises by the weights (per pixel, over the 3 channels): weight 1 everywhere is the MSE,
    and the edge term adds edge_weight * L1 of the finite differences."""
    from train.nano.train_vae import reconstruction_loss

    recon, target = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 3, 8, 8)
    mse = ((recon - target) ** 2).mean()
    assert torch.allclose(reconstruction_loss(recon, target, 0.0, torch.ones(2, 1, 8, 8)), mse)
    assert torch.allclose(reconstruction_loss(recon, target, 0.0, torch.full((2, 1, 8, 8), 5.0)), mse)
    assert torch.allclose(reconstruction_loss(recon, target, 0.0), mse)


def test_subject_crops_stay_inside_the_image_on_the_latent_grid():
    """random_crops with centre_prob 1: every crop is placed around its centre, snapped to the 8-px grid and
    clamped inside the image (a subject near the right edge gives the right-most window)."""
    from train.nano.train_vae import random_crops

    images = torch.arange(64, dtype=torch.float32).expand(6, 1, 64, 64).clone()  # [B, 1, H, W]: pixel = its x
    centres = torch.tensor([[62.0, 32.0]] * 3 + [[2.0, 32.0]] * 3)  # (x, y) px
    crops = random_crops(images, 16, torch.Generator().manual_seed(0), centres, centre_prob=1.0)
    assert crops.shape == (6, 1, 16, 16)
    for crop in crops[:3]:
        assert torch.equal(crop[0, 0], torch.arange(48, 64, dtype=torch.float32))
    for crop in crops[3:]:
        assert torch.equal(crop[0, 0], torch.arange(0, 16, dtype=torch.float32))


def test_unet_training_drops_captions_by_uncond_prob_and_warms_up_the_ema(parts, tmp_path, monkeypatch):
    """--uncond-prob 1 replaces every caption embedding by the empty caption's, 0 replaces none; after step 1
    the EMA is d * init + (1 - d) * trained, with the warmed-up decay d = min(ema_decay, (1 + 1) / (10 + 1))."""
    from safetensors.torch import load_file

    from train.common.checkpointing import load_checkpoint
    from train.nano import train_unet
    from train.nano.unet import NanoUNet, NanoUNetConfig

    contexts = []
    original = train_unet.diffusion_loss

    def spy(unet, latents, context, g, alphas):
        contexts.append(context.clone())  # [B, 77, 768]
        return original(unet, latents, context, g, alphas)

    monkeypatch.setattr(train_unet, "diffusion_loss", spy)
    args = unet_args(parts)
    for prob in ("1.0", "0.0"):
        args[args.index("--uncond-prob") + 1] = prob
        run_command("train_unet", args + ["--output-dir", str(tmp_path / prob), "--max-steps", "1"])
    empty = load_file(str(tmp_path / "1.0" / "cache.safetensors"))["empty"][0]  # [77, 768]
    assert len(contexts) == 2 and len(contexts[0]) == 4
    assert all(torch.equal(row, empty) for row in contexts[0])
    assert not any(torch.equal(row, empty) for row in contexts[1])

    torch.manual_seed(0)  # --seed 0 seeds the init
    init = NanoUNet(NanoUNetConfig(real_channels=16)).state_dict()
    state = load_checkpoint(tmp_path / "0.0")["model"]
    decay = min(0.999, 2 / 11)
    moved = 0
    for name, start in init.items():
        trained, ema = state[f"unet.{name}"], state[f"ema.{name}"]
        assert torch.allclose(ema, decay * start + (1 - decay) * trained, rtol=0, atol=1e-6), name
        moved += not torch.equal(trained, start)
    assert moved > 10  # the step changed the weights, so the EMA check is not vacuous


def _tiny_pair(tmp_path) -> te.ContrastivePair:
    tok = te.load_tokenizer(te.write_tokenizer_files(world_vocabulary(), tmp_path))
    torch.manual_seed(0)
    return te.ContrastivePair(te.text_config(tok, layers=1, intermediate=64, heads=12),
                              te.vision_config(32, layers=1, heads=2), embed_dim=8)


def test_contrastive_loss_splits_the_target_over_identical_captions_and_caps_the_temperature(tmp_path):
    """Pairs with the same caption are soft positives (targets normalised per row): two identical pairs
    with identical embeddings see uniform logits and half the target each, loss log 2. The logit scale
    is capped at 100 as in CLIP."""
    import math

    pair = _tiny_pair(tmp_path)
    e = torch.nn.functional.normalize(torch.ones(2, 8), dim=-1)  # [B, E]
    same = torch.ones(2, 2, dtype=torch.bool)
    assert pair.contrastive_loss(e, e, same).item() == pytest.approx(math.log(2), abs=1e-6)
    with torch.no_grad():
        pair.logit_scale.fill_(6.0)  # exp(6) = 403 > 100
    assert pair.similarity(e[:1], e[:1]).item() == pytest.approx(100.0, rel=1e-4)


def test_vision_tower_sees_pixels_mapped_to_minus_one_one(tmp_path):
    """pool_images(p) feeds the tower p * 2 - 1 (mean = std = 0.5, what save_vision_preprocessor records)."""
    pair = _tiny_pair(tmp_path).eval()
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # [B, 3, H, W] in [0, 1]
    with torch.no_grad():
        expected = pair.vision(pixel_values=pixels * 2 - 1).pooler_output
        assert torch.allclose(pair.pool_images(pixels), expected, atol=1e-6)
    te.save_vision_preprocessor(tmp_path / "vision")
    config = json.loads((tmp_path / "vision" / "preprocessor_config.json").read_text())
    assert config["image_mean"] == config["image_std"] == [0.5, 0.5, 0.5]


def test_weights_fingerprint_is_that_of_the_fp16_weights(tmp_path):
    """The fingerprint rounds weights to fp16 (the shipped precision): a text model and its fp16 round trip
    match, a change fp16 can represent does not."""
    import copy

    from transformers import CLIPTextModel

    tok = te.load_tokenizer(te.write_tokenizer_files(world_vocabulary(), tmp_path))
    torch.manual_seed(0)
    model = CLIPTextModel(te.text_config(tok, layers=1, intermediate=64, heads=12))
    rounded = copy.deepcopy(model).half().float()
    assert te.weights_fingerprint(model) == te.weights_fingerprint(rounded)
    assert len(te.weights_fingerprint(model)) == 16
    with torch.no_grad():
        next(rounded.parameters()).view(-1)[0] += 0.01  # far above fp16 resolution at this size
    assert te.weights_fingerprint(model) != te.weights_fingerprint(rounded)
