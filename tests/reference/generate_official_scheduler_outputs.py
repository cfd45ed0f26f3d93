"""Generate tests/reference/official_scheduler_outputs.safetensors from diffusers 0.21.4's own schedulers.

The official Kosmos-G code samples with diffusers 0.21.4 (its vl_setup.sh pins it). Run by hand, never in CI
(it needs a git mirror of huggingface/diffusers, which tests do not):

    OMP_NUM_THREADS=1 python tests/reference/generate_official_scheduler_outputs.py [--mirror DIR]

The three scheduler files of tag v0.21.4 (DPM-Solver multistep, DDIM, PNDM) are read from the mirror with
`git show` and executed in memory as modules of the installed diffusers (their relative imports: ConfigMixin,
SchedulerMixin, randn_tensor); nothing of them is written into this repository. Stored: for each case, the
final latent of a whole sampling run of the old scheduler on SD1.5's noise schedule with a toy denoiser
(`toy_noise_prediction`: the exact noise estimate for data from two narrow Gaussians, nonlinear like a U-Net's),
and its timesteps. tests/test_official_sampling.py runs kosmosg_core.sd15's schedulers the same
way and compares.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for `reference.in_memory_module`
from reference.in_memory_module import module_from_source  # noqa: E402

DEFAULT_MIRROR = Path("/work/.mirror/huggingface+diffusers/repo")
OUTPUT = Path(__file__).parent / "official_scheduler_outputs.safetensors"
TAG = "v0.21.4"
SOURCES = {"dpm": "scheduling_dpmsolver_multistep.py", "ddim": "scheduling_ddim.py", "pndm": "scheduling_pndm.py"}
CLASSES = {"dpm": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler", "pndm": "PNDMScheduler"}
# (scheduler, steps): DPM-Solver below 15 steps also takes its lower-order final steps (14 and 15: either side); DDIM at 30,
# a count that does not divide 1000 (its spacing floors the stride); 50 is the demo's count,
# 100 DreamBench's
CASES = [("dpm", 10), ("dpm", 14), ("dpm", 15), ("dpm", 20), ("dpm", 50), ("dpm", 100), ("ddim", 30), ("ddim", 50),
         ("pndm", 50)]
LATENT_SHAPE = (1, 4, 8, 8)
DATA_SPREAD = 0.1  # the toy data: each value from one of two narrow Gaussians with this standard deviation
GENERATOR_VERSION = "4"


def sd15_schedule_config() -> dict:
    """SD1.5's scheduler config as the pack ships it (the noise schedule every case runs on)."""
    path = Path(__file__).parents[2] / "kosmosg_core" / "sd15_config" / "scheduler" / "scheduler_config.json"
    return {key: value for key, value in json.loads(path.read_text()).items() if not key.startswith("_")}


def start_and_centres() -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded starting noise [1, 4, 8, 8] and the toy data's two centres per value [2, 1, 4, 8, 8]."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(LATENT_SHAPE, generator=generator)
    centre = torch.randn(LATENT_SHAPE, generator=generator) * 0.9
    return start, torch.stack([centre, -centre])


def toy_noise_prediction(sample: torch.Tensor, alpha_cumprod: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """The exact noise estimate at noise level `alpha_cumprod` when each data value comes, with even odds, from
    N(centres[0], DATA_SPREAD^2) or N(centres[1], DATA_SPREAD^2): a stand-in for a U-Net that bends as one does
    (which centre a value heads for is decided along the way), so a solver's every step shapes where it ends."""
    signal, noise = alpha_cumprod.sqrt(), (1 - alpha_cumprod).sqrt()
    variance = signal**2 * DATA_SPREAD**2 + noise**2  # of the noisy sample around signal * centre
    offsets = sample - signal * centres  # [2, 1, 4, 8, 8]
    odds = torch.softmax(-offsets**2 / (2 * variance), dim=0)  # which centre, given the noisy sample
    return (odds * offsets).sum(dim=0) * noise / variance


def run_trajectory(scheduler, steps: int) -> tuple[torch.Tensor, list[int]]:
    """A whole sampling run of `scheduler` -> (final latent [1, 4, 8, 8], timesteps)."""
    start, centres = start_and_centres()
    scheduler.set_timesteps(steps)
    sample = start * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        prediction = toy_noise_prediction(model_input, scheduler.alphas_cumprod[int(t)], centres)
        sample = scheduler.step(prediction, t, sample).prev_sample
    return sample, [int(t) for t in scheduler.timesteps]


def _git(mirror: Path, *args: str) -> bytes:
    return subprocess.run(["git", "--git-dir", str(mirror), *args], check=True, capture_output=True).stdout


def load_old_schedulers(mirror: Path) -> tuple[str, dict, dict[str, str]]:
    """-> (the tag's commit, {name: old scheduler class}, {repo path: git blob SHA-1})."""
    import diffusers.schedulers

    commit = _git(mirror, "rev-parse", f"{TAG}^{{commit}}").decode().strip()
    classes, blobs = {}, {}
    for name, file in SOURCES.items():
        path = f"src/diffusers/schedulers/{file}"
        data = _git(mirror, "show", f"{commit}:{path}")
        blobs[path] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        module_name = f"{diffusers.schedulers.__name__}._official_{name}"  # inside the package: relative imports
        module = module_from_source(data, f"{TAG}:{path}", module_name, diffusers.schedulers.__name__, register=True)
        classes[name] = getattr(module, CLASSES[name])
    return commit, classes, blobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", type=Path, default=DEFAULT_MIRROR, help="bare git dir of huggingface/diffusers")
    args = parser.parse_args()
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    commit, classes, blobs = load_old_schedulers(args.mirror)
    config = sd15_schedule_config()
    tensors, timesteps = {}, {}
    for name, steps in CASES:
        final, ts = run_trajectory(classes[name].from_config(config), steps)
        tensors[f"{name}.{steps}"] = final.contiguous()
        timesteps[f"{name}.{steps}"] = ts
    metadata = {"diffusers_tag": TAG, "diffusers_commit": commit, "blobs": json.dumps(blobs),
                "timesteps": json.dumps(timesteps), "generator_version": GENERATOR_VERSION}
    save_file(tensors, str(OUTPUT), metadata=metadata)
    print(f"wrote {OUTPUT} ({len(tensors)} cases) from diffusers {TAG} ({commit})")


if __name__ == "__main__":
    main()
