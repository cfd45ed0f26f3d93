"""Save / Load Conditioning nodes: ComfyUI glue over kosmosg_core.conditioning_file (the file format)."""

from __future__ import annotations

import comfy.model_management as mm
import folder_paths
from comfy_api.latest import io, ui

from ..kosmosg_core.conditioning_file import check_filename_prefix, read_conditioning_file, save_conditioning
from ..kosmosg_core.errors import KosmosGError
from . import paths
from .types import CATEGORY


class KosmosGSaveConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KosmosGSaveConditioning",
            display_name="Kosmos-G Save Conditioning",
            category=CATEGORY,
            description=(
                "Saves a conditioning (e.g. Kosmos-G Encode's positive) as a .safetensors file in "
                "models/kosmosg_conditioning, named <prefix>_<content hash>, so a subject can be reused later without "
                "the Kosmos-G model. Identical conditionings map to the same file. ControlNet/hook attachments are "
                "not saved."),
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="Conditioning to save."),
                io.String.Input("filename_prefix", default="kosmosg",
                                tooltip="Start of the file name; a hash of the content is appended."),
            ],
            outputs=[io.String.Output(display_name="filename",
                                      tooltip="Name of the saved file, as Kosmos-G Load Conditioning lists it.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None):
        if filename_prefix is None:  # from a link: checked when the node runs
            return True
        try:  # before the encode upstream runs, not after
            check_filename_prefix(filename_prefix, folder_paths.get_folder_paths(paths.CONDITIONING_FOLDER)[0])
        except KosmosGError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, conditioning, filename_prefix="kosmosg") -> io.NodeOutput:
        dropped = []  # ControlNet / hook attachments are live objects, not data: said where the user looks
        name = save_conditioning(conditioning, folder_paths.get_folder_paths(paths.CONDITIONING_FOLDER)[0],
                                 filename_prefix, dropped_keys=dropped)
        note = f" (without {', '.join(dropped)}: not data, so not saved; apply it again after loading)" if dropped else ""
        return io.NodeOutput(name, ui=ui.PreviewText(f"Saved {name}{note}"))


class KosmosGLoadConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KosmosGLoadConditioning",
            display_name="Kosmos-G Load Conditioning",
            category=CATEGORY,
            description=("Loads a conditioning saved by Kosmos-G Save Conditioning (or written by `python -m kosmosg_core "
                         "encode --out`) from models/kosmosg_conditioning."),
            inputs=[
                io.Combo.Input("conditioning_file",
                               options=paths.list_files(paths.CONDITIONING_FOLDER, paths.CONDITIONING_EXTENSIONS),
                               tooltip="A file written by Kosmos-G Save Conditioning or `encode --out`."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning", tooltip="The saved conditioning.")],
        )

    @classmethod
    def validate_inputs(cls, conditioning_file=None):
        if conditioning_file is not None and paths.listed_file(paths.CONDITIONING_FOLDER, conditioning_file) is None:
            return paths.conditioning_missing_message(conditioning_file)
        return True

    @classmethod
    def fingerprint_inputs(cls, conditioning_file):
        return paths.file_fingerprint(folder_paths.get_full_path(paths.CONDITIONING_FOLDER, conditioning_file or ""))

    @classmethod
    def execute(cls, conditioning_file) -> io.NodeOutput:
        return io.NodeOutput(read_conditioning_file(paths.resolve_conditioning(conditioning_file),
                                                    device=mm.intermediate_device()))
