"""The SD1.5 model `generate` samples with, through diffusers: loaded offline from a single file, a diffusers folder,
the pack's nano image model or the U-Net and VAE an official checkpoint stores; its checks (layout, U-Net width);
and the official schedulers, tried on the steps asked for before anything samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import DEFAULT_SCHEDULER, NANO_SD15_FORMAT, SCHEDULER_SETTINGS, SCHEDULERS, SD15_CONFIG_DIR, SD15_CONTEXT_DIM
from .errors import CheckpointError, CheckpointNotFoundError, GenerationSettingsError, MissingPackageError, first_line
from .files import check_input_path_length, safetensors_format
from .nano_sd15 import load_nano_sd15
from .official_sd15 import load_official_sd15

_NO_TEXT_ENCODER = dict(text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None,
                        image_encoder=None, requires_safety_checker=False)


def diffusers_dtype_argument(dtype: torch.dtype, diffusers_version: str) -> dict:
    """The pipeline loaders' dtype keyword: diffusers 0.40 renamed `torch_dtype` to `dtype` (following transformers;
    the old name warns that it will go), and the releases before it (0.35.2, the lower bound) know only
    `torch_dtype`."""
    from packaging.version import Version  # a dependency of diffusers

    return {"dtype": dtype} if Version(diffusers_version).release[:2] >= (0, 40) else {"torch_dtype": dtype}


# What diffusers reads from a model folder, and from the config folder of a single file. Checked up front: for a
# missing unet/ or vae/ diffusers says the folder itself lacks a config.json, and for a config folder it blames the file.
SD15_FOLDER_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json")


def check_sd15_paths(sd_model, config_dir=None) -> Path | None:
    """The SD1.5 model's path (None: the one an official Kosmos-G checkpoint stores, `official_sd15`) and the config
    folder, checked: what is missing or of the wrong kind named with the fix."""
    path = None if sd_model is None else Path(sd_model)
    if path is not None:
        _check_sd15_model_path(path, config_dir)
    if config_dir is not None:
        check_input_path_length(config_dir, "SD1.5 config folder", CheckpointNotFoundError, kind="folder")
        if not Path(config_dir).is_dir():
            raise CheckpointNotFoundError(f"SD1.5 config folder not found: {config_dir}. Give a diffusers-layout folder "
                                          "with unet/ vae/ scheduler/ configs, or leave it out for SD1.5's own.")
        _check_sd15_folder(Path(config_dir), "SD1.5 config folder", "give a whole one, or leave it out for SD1.5's own.")
    return path


def _check_sd15_model_path(path: Path, config_dir) -> None:
    check_input_path_length(path, "SD1.5 model", CheckpointNotFoundError, kind="file or folder")  # exists() raises on it
    if not path.exists():
        raise CheckpointNotFoundError(f"SD1.5 model not found: {path}. Give a single-file checkpoint "
                                      "(.safetensors/.ckpt) or a diffusers folder (with model_index.json).")
    if path.is_dir():
        _check_sd15_folder(path, "SD1.5 model folder", "give a whole diffusers SD1.5 folder or a single-file checkpoint.")
    elif config_dir is not None and is_nano_sd15(path):
        raise GenerationSettingsError(f"{path} is the pack's nano image model, whose layout is fixed: --sd-config "
                                      f"({config_dir}) is for other single-file SD1.5 checkpoints; leave it out.")


def is_nano_sd15(path: Path) -> bool:
    """The pack's nano image model (models/nano/nano-sd15.safetensors, or one trained with train/nano)?"""
    try:
        return safetensors_format(path) == NANO_SD15_FORMAT
    except ValueError:  # unreadable: diffusers' own error names the problem
        return False


def _check_sd15_folder(folder: Path, what: str, fix: str) -> None:
    missing = [name for name in SD15_FOLDER_FILES if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{what} {folder} has no {', '.join(missing)} (a diffusers SD1.5 folder holds "
                              f"{', '.join(SD15_FOLDER_FILES)}); {fix}")


def load_sd15(sd_model, dtype: torch.dtype, device: torch.device, scheduler: str = DEFAULT_SCHEDULER, config_dir=None,
              steps: int | None = None, official_checkpoint=None):
    """A diffusers StableDiffusionPipeline without text encoder, from a folder, a single file or the pack's nano image
    model (`nano_sd15`), offline; sd_model None: the U-Net and VAE stored in `official_checkpoint` (`official_sd15`).
    With `steps`, its scheduler is tried on them first (`dry_run_scheduler`)."""
    path = check_sd15_paths(sd_model, config_dir)
    _stable_diffusion_pipeline()  # diffusers missing or broken: said before anything loads
    if path is None:  # the SD1.5 U-Net and VAE an official Kosmos-G checkpoint stores: errors of their own
        if official_checkpoint is None:
            raise ValueError("load_sd15 needs sd_model or official_checkpoint.")
        path = sd_model = Path(official_checkpoint)  # what the messages below name
        pipe = load_official_sd15(path, dtype, config_dir)
    else:
        pipe = _load_sd15_model(path, dtype, config_dir)
    check_sd15_unet(pipe, path)
    try:
        pipe.scheduler = official_scheduler(scheduler, pipe.scheduler.config)
    except Exception as e:  # a damaged file (many kinds, like loading's)
        raise _scheduler_error(scheduler, "be built", sd_model, config_dir, e) from e
    if steps is not None:
        check_scheduler_steps(pipe.scheduler, scheduler, steps, sd_model, config_dir)
    pipe.set_progress_bar_config(disable=True)
    # diffusers warns that float16 "cannot run" on the CPU: torch runs it there now (slowly)
    return pipe.to(device, silence_dtype_warnings=True)


def _stable_diffusion_pipeline():
    """diffusers' StableDiffusionPipeline class, or a MissingPackageError saying what to install."""
    try:
        from diffusers import StableDiffusionPipeline
    except (ImportError, RuntimeError) as error:  # missing, or too old for this transformers (diffusers < 0.35.2
        # with transformers 5 raises RuntimeError here). Not needed by the ComfyUI nodes: requirements-train.txt
        raise _missing_diffusers(error) from error
    return StableDiffusionPipeline


def _load_sd15_model(path: Path, dtype: torch.dtype, config_dir):
    """A folder, a single file or the nano image model -> the pipeline; diffusers' many errors as one CheckpointError."""
    from diffusers import __version__ as diffusers_version

    StableDiffusionPipeline = _stable_diffusion_pipeline()
    nano = is_nano_sd15(path)
    try:
        if nano:
            return load_nano_sd15(path, dtype)
        if path.is_dir():
            return StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, **_NO_TEXT_ENCODER,
                                                           **diffusers_dtype_argument(dtype, diffusers_version))
        return StableDiffusionPipeline.from_single_file(str(path), config=str(config_dir or SD15_CONFIG_DIR),
                                                        local_files_only=True, **_NO_TEXT_ENCODER,
                                                        **diffusers_dtype_argument(dtype, diffusers_version))
    except ImportError as e:  # a diffusers release without the modules the nano model is built from
        raise _missing_diffusers(e) from e
    except Exception as e:  # diffusers raises many kinds (OSError, ValueError, SingleFileComponentError...)
        if nano:  # the format is ours: missing keys (KeyError), wrong shapes (RuntimeError)...
            raise CheckpointError(f"Could not load {path} as the pack's nano image model ({first_line(e)}): the file "
                                  "is damaged; restore it (git checkout models/nano) or export it again "
                                  "(python -m train.nano.export_nano).") from e
        raise CheckpointError(f"Could not load {path} as a Stable Diffusion 1.5 model ({first_line(e)}); give an SD1.5 "
                              "checkpoint (the U-Net, VAE and text encoder weights) or a diffusers SD1.5 folder.") from e


def _missing_diffusers(error: Exception) -> MissingPackageError:
    lines = str(error).strip().splitlines() or [type(error).__name__]
    # diffusers' lazy imports say "Failed to import X because of the following error (look up to see its
    # traceback):" and the cause on the last line
    cause = lines[-1] if lines[0].startswith("Failed to import") else lines[0]
    return MissingPackageError(f"generate needs diffusers >= 0.35.2 ({cause}); install it with "
                               "`pip install -r requirements-train.txt` (from this repository).")


def check_scheduler_steps(scheduler, name: str, steps: int, sd_model, config_dir=None) -> None:
    """`dry_run_scheduler`, its failure a GenerationSettingsError naming the scheduler and its settings file."""
    try:
        dry_run_scheduler(scheduler, steps)
    except Exception as e:  # settings this scheduler cannot run: IndexError, ValueError, NaN...
        timesteps = scheduler.config.get("num_train_timesteps")
        if isinstance(timesteps, int) and steps >= timesteps:  # every scheduler fails there: say the bound
            raise GenerationSettingsError(
                f"The {name} scheduler cannot run {steps} steps: the model's noise schedule has {timesteps} timesteps "
                f"(SD1.5's: 1000), and a sampler takes fewer steps than that: use at most {timesteps - 1} (the "
                "official demo: 50).") from e
        raise _scheduler_error(name, f"run {steps} steps", sd_model, config_dir, e) from e


def check_scheduler_settings(sd_model, config_dir, name: str, steps: int) -> None:
    """The scheduler `name` at `steps` steps on the settings file the SD model will use (its folder's, else
    `config_dir`'s or SD1.5's: the nano and official models' too), before any model loads: a step count it cannot
    take is refused in a second, not after the Kosmos-G weights are read and the prompt encoded. `load_sd15` checks
    the loaded model's own scheduler again."""
    settings = _scheduler_settings_file(sd_model, config_dir)
    if not settings.is_file():
        return  # load_sd15 names what is missing
    _stable_diffusion_pipeline()  # diffusers missing or broken: said here
    try:
        scheduler = official_scheduler(name, json.loads(settings.read_text(encoding="utf-8")))
    except Exception as e:  # a damaged file (many kinds)
        raise _scheduler_error(name, "be built", sd_model, config_dir, e) from e
    check_scheduler_steps(scheduler, name, steps, sd_model, config_dir)


def _scheduler_settings_file(sd_model, config_dir) -> Path:
    """The scheduler settings an SD model is built with: a diffusers folder's own, else `config_dir`'s or SD1.5's
    (a single file, the nano model, an official checkpoint's U-Net: sd_model None)."""
    folder = Path(sd_model) if sd_model is not None and Path(sd_model).is_dir() else Path(config_dir or SD15_CONFIG_DIR)
    return folder / "scheduler" / "scheduler_config.json"


def _scheduler_error(name: str, doing: str, sd_model, config_dir, error: Exception) -> GenerationSettingsError:
    settings = _scheduler_settings_file(sd_model, config_dir)
    return GenerationSettingsError(f"The {name} scheduler cannot {doing} with the settings in {settings} "
                                   f"({first_line(error)}); choose other steps or another scheduler "
                                   f"({', '.join(SCHEDULERS)}), or repair that file.")


def official_scheduler(name: str, config):
    """The diffusers scheduler `name` ("dpm", "ddim", "pndm") on a model's scheduler `config` (its noise schedule),
    with the settings that make it step as in the official code (SCHEDULER_SETTINGS)."""
    import diffusers

    return getattr(diffusers, SCHEDULERS[name]).from_config(config, **SCHEDULER_SETTINGS.get(name, {}))


def dry_run_scheduler(scheduler, steps: int) -> None:
    """Every step of (a copy of) `scheduler` on a 1-pixel latent, in well under a second. diffusers fails on settings
    it cannot run only mid-sampling (DDIM at 1000 steps: a bare IndexError; PNDM without skip_prk_steps below 4 steps;
    a damaged prediction_type or timestep_spacing) or not at all (DPM-Solver at 1000 steps: black NaN images)."""
    probe = type(scheduler).from_config(scheduler.config)
    probe.set_timesteps(steps)
    sample = torch.ones(1, 4, 1, 1)
    for t in probe.timesteps:
        sample = probe.step(probe.scale_model_input(sample, t), t, sample).prev_sample
    if not torch.isfinite(sample).all():
        raise FloatingPointError("its steps come out inf/NaN")


def native_size(sd) -> int:
    """The side in pixels a `load_sd15` pipeline makes by default: its U-Net's sample size x the VAE's scale."""
    return sd.unet.config.sample_size * sd.vae_scale_factor


def check_sd15_width(context_dim: int, checkpoint) -> None:
    if context_dim != SD15_CONTEXT_DIM:
        raise CheckpointError(f"{checkpoint}: this Kosmos-G checkpoint produces {context_dim}-wide conditioning but "
                              f"SD1.5 expects {SD15_CONTEXT_DIM}; give a checkpoint made for SD1.5.")


def check_sd15_unet(pipe, sd_model) -> None:
    """diffusers loads any Stable Diffusion U-Net into this pipeline (an SD 2.x or SDXL folder, or a file with their
    --sd-config): one of another shape fails only mid-sampling, with a bare shape error."""
    unet, latent_channels = pipe.unet.config, pipe.vae.config.latent_channels
    if unet.cross_attention_dim != SD15_CONTEXT_DIM:
        raise CheckpointError(f"{sd_model}: this U-Net reads {unet.cross_attention_dim}-wide conditioning (SD 2.x: "
                              f"1024, SDXL: 2048) but Kosmos-G makes SD1.5's {SD15_CONTEXT_DIM}; give an SD1.5 model.")
    if unet.in_channels != latent_channels or unet.out_channels != latent_channels:
        raise CheckpointError(f"{sd_model}: this U-Net takes {unet.in_channels} input channels (an inpainting or "
                              f"instruction-editing model?) but its VAE makes {latent_channels}-channel latents; "
                              "give a text-to-image SD1.5 model.")
