"""Kosmos-G SD1.5 From Checkpoint: the SD1.5 U-Net and VAE an official Kosmos-G checkpoint stores, as ComfyUI's
MODEL and VAE.

The official model holds SD1.5's U-Net and VAE (diffusers names: kosmosg_core.official_sd15), and the official demo
samples with them: loading them from the same file needs no separate SD1.5 download and is exactly the demo's
networks. ComfyUI takes a U-Net in its own (LDM) names, and matches a diffusers-named one only against whole known
configs; the names are converted here from the stored tensors' own layout (so any size converts: tested on tiny
U-Nets), then ComfyUI detects the model from them as it does for any checkpoint. ComfyUI's VAE converts diffusers
names itself.
"""

from __future__ import annotations

import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..kosmosg_core.errors import CheckpointError, KosmosGError, first_line
from ..kosmosg_core.official_sd15 import read_official_sd15, unet_block_layout
from . import paths
from .types import CATEGORY

USE_LOAD_CHECKPOINT = "load SD1.5 with Load Checkpoint instead (any SD1.5 checkpoint)"


def unet_in_comfy_names(state_dict, source: str) -> dict:
    """A diffusers-named SD U-Net's weights -> the same tensors in ComfyUI's (LDM) names; a CheckpointError naming
    `source` when a tensor has no place there (not an SD-type U-Net)."""
    names = comfy.utils.unet_to_diffusers(unet_block_layout(state_dict))  # diffusers name -> LDM name
    unplaced = sorted(key for key in state_dict if key not in names)
    if unplaced or not state_dict:
        raise CheckpointError(f"The U-Net stored in {source} is not laid out as an SD1.5 U-Net ({len(unplaced)} "
                              f"tensor(s) have no place in one, e.g. {', '.join(unplaced[:3]) or 'none stored'}); "
                              f"{USE_LOAD_CHECKPOINT}.")
    return {names[key]: tensor for key, tensor in state_dict.items()}


def comfy_unet(weights: dict, source: str, disable_dynamic: bool = False):
    """The stored U-Net's weights (diffusers names) -> ComfyUI's ModelPatcher (the MODEL), every tensor of the
    model ComfyUI detects among them; a CheckpointError naming `source` otherwise."""
    renamed = unet_in_comfy_names(weights, source)
    stored = set(renamed)  # ComfyUI takes tensors out of the dict as it loads them
    try:
        # disable_dynamic: asked for by ComfyUI versions that have it (through cached_patcher_init), only by them
        model = comfy.sd.load_diffusion_model_state_dict(renamed, **({"disable_dynamic": True} if disable_dynamic
                                                                      else {}))
    except (KeyError, RuntimeError) as e:  # detection reads named tensors; loading refuses other shapes
        raise CheckpointError(f"ComfyUI cannot build the U-Net stored in {source} ({first_line(e)}): it lacks "
                              f"tensors of an SD1.5 U-Net or holds them in other shapes; {USE_LOAD_CHECKPOINT}.") from e
    if model is None:
        raise CheckpointError(f"ComfyUI does not recognise the U-Net stored in {source} as a model it can sample "
                              f"with; {USE_LOAD_CHECKPOINT}.")
    missing = sorted(set(model.model.diffusion_model.state_dict()) - stored)
    if missing:  # ComfyUI loads what it finds and leaves the rest at random values, with a log line
        raise CheckpointError(f"The U-Net stored in {source} lacks {len(missing)} tensor(s) of the SD1.5 U-Net "
                              f"ComfyUI detects (e.g. {', '.join(missing[:3])}); {USE_LOAD_CHECKPOINT}.")
    model.cached_patcher_init = (reload_stored_unet, (source,))
    return model


def comfy_vae(weights: dict, source: str):
    """The stored VAE's weights (diffusers names) -> ComfyUI's VAE (which converts the names itself)."""
    try:
        vae = comfy.sd.VAE(sd=weights)
        vae.throw_exception_if_invalid()
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"ComfyUI does not recognise the VAE stored in {source} ({first_line(e)}); "
                              f"{USE_LOAD_CHECKPOINT}.") from e
    if getattr(vae, "patcher", None) is not None:  # ComfyUI's reload factory for per-device copies
        vae.patcher.cached_patcher_init = (reload_stored_vae_patcher, (source,))
    return vae


def _reloaded(part: str, path: str, build):
    """ComfyUI's reload factories (`cached_patcher_init`): the part read again from the file. ComfyUI's callers
    pass over a loader that cannot reload (a RuntimeError); a file damaged since is one."""
    try:
        return build(read_official_sd15(path, USE_LOAD_CHECKPOINT, [part])[part], path)
    except KosmosGError as e:
        raise RuntimeError(f"Kosmos-G SD1.5 From Checkpoint cannot read the {part} again: {e}") from e


def reload_stored_unet(path: str, disable_dynamic: bool = False):
    return _reloaded("U-Net", path, lambda weights, source: comfy_unet(weights, source, disable_dynamic))


def reload_stored_vae_patcher(path: str, disable_dynamic: bool = False):
    return _reloaded("VAE", path, comfy_vae).patcher


class KosmosGCheckpointSD15(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KosmosGCheckpointSD15",
            display_name="Kosmos-G SD1.5 From Checkpoint",
            category=CATEGORY,
            description=(
                "The SD1.5 U-Net and VAE stored inside an official Kosmos-G checkpoint_final.pt (the networks the "
                "official demo samples with), as MODEL and VAE: no separate SD1.5 download. Connect MODEL to the "
                "sampler and VAE to VAE Decode; Kosmos-G Encode gives the conditioning. A converted .safetensors "
                "keeps only what conditioning uses: use Load Checkpoint with an SD1.5 checkpoint then."),
            search_aliases=["kosmos", "sd1.5", "unet", "vae", "official checkpoint"],
            inputs=[
                io.Combo.Input("checkpoint", options=paths.list_files(paths.CHECKPOINT_FOLDER,
                                                                      paths.OFFICIAL_EXTENSIONS),
                               tooltip="The official Kosmos-G checkpoint (checkpoint_final.pt) in models/kosmosg."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The stored SD1.5 U-Net."),
                     io.Vae.Output(display_name="VAE", tooltip="The stored SD1.5 VAE.")],
        )

    @classmethod
    def validate_inputs(cls, checkpoint=None):
        return paths.checkpoint_input_problem(checkpoint)

    @classmethod
    def fingerprint_inputs(cls, checkpoint):
        # Re-run (and reload) when the file on disk is replaced.
        return paths.file_fingerprint(folder_paths.get_full_path(paths.CHECKPOINT_FOLDER, checkpoint or ""))

    @classmethod
    def execute(cls, checkpoint) -> io.NodeOutput:
        path = paths.resolve_checkpoint(checkpoint)
        stored = read_official_sd15(path, USE_LOAD_CHECKPOINT)  # one read; both parts checked before any is built
        return io.NodeOutput(comfy_unet(stored["U-Net"], path), comfy_vae(stored["VAE"], path))
