"""The shipped Kosmos-G nano model (models/nano/kosmosg-nano.safetensors, train.export of the nano run).

- it loads through the CLI like any pack checkpoint (tokenizer inside the file) and encodes the
  out-of-the-box workflow's prompt with its shipped subject images to one [1, 77, 768] condition;
- the README's figures (docs/results/nano-kosmosg.json, written by the documented eval command) are
  shown in the README and reproduced by the eval on a small sample within two binomial standard errors.
(The node loads it in tests/test_nodes_unit.py; the out-of-the-box workflow runs in real ComfyUI and is
judged in tests/integration/test_start_script.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from support import nano_ootb
from train.eval import nano_image, nano_kosmosg

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "nano" / "kosmosg-nano.safetensors"
README_FIGURES = REPO / "docs" / "results" / "nano-kosmosg.json"
FIGURES = ("single_subject_fidelity", "two_subject_fidelity", "text_fidelity", "text_prompt_ceiling_single",
           "text_prompt_ceiling_two", "text_only_baseline", "random_baseline")


def test_cli_encodes_the_out_of_the_box_prompt_with_the_shipped_model(tmp_path):
    images = nano_ootb.write_subject_images(tmp_path / "subjects")
    out = tmp_path / "cond.safetensors"
    cmd = [sys.executable, "-m", "kosmosg_core", "encode", "--checkpoint", str(SHIPPED), "--prompt", nano_ootb.PROMPT,
           "--out", str(out)]
    for path in images:
        cmd += ["--image", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    cond = load_file(str(out))["cond"]
    assert cond.shape == (1, 77, 768) and torch.isfinite(cond).all()

    uncond_out = tmp_path / "uncond.safetensors"
    cmd = cmd[:cmd.index("--prompt")] + ["--prompt", "", "--out", str(uncond_out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not torch.allclose(load_file(str(uncond_out))["cond"], cond, atol=1e-3)


def test_readme_shows_the_recorded_figures():
    figures = json.loads(README_FIGURES.read_text())
    readme = (REPO / "README.md").read_text()
    for key in FIGURES:
        assert f"{figures[key]:.3f}" in readme, key


def test_small_eval_reproduces_the_readme_figures_within_noise():
    figures = json.loads(README_FIGURES.read_text())
    cfg = nano_kosmosg.NanoKosmosGConfig(samples=32, seed=1, num_threads=1)
    small = nano_kosmosg.run(cfg)
    for key, n in (("single_subject_fidelity", 16), ("two_subject_fidelity", 16)):
        recorded = figures[key]
        margin = 2 * (nano_image.binomial_stderr(recorded, n) + figures[key + "_stderr"]) + 1 / n
        assert abs(small[key] - recorded) <= margin, (key, small[key], recorded, margin)
