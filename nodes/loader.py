"""Kosmos-G Loader and Convert Checkpoint nodes."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io, ui

from ..kosmosg_core.files import check_output_file
from ..kosmosg_core.tokenizer import TOKENIZER_FILENAMES, tokenizer_places_text
from . import paths
from .model_management import DTYPE_CHOICES, device_choices, load_model
from .types import CATEGORY, KosmosGModelType

CONVERT_DTYPES = ["keep", "fp16", "bf16", "fp32"]
_WEIGHT_EXTENSIONS = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def converted_file_name(source: str, output_name: str) -> str:
    """The Convert node's output file name: `output_name` (a plain name; a weights extension of any case is
    replaced), or when empty the source's own name; always `<name>.safetensors`, never a hidden file."""
    requested = (output_name or "").strip()
    if requested and (os.path.basename(requested) != requested or requested in (".", "..")):
        raise ValueError(f"output_name {output_name!r} must be a plain file name (no folders); the file is written "
                         "beside the source checkpoint.")
    stem = requested or os.path.basename(source)
    root, extension = os.path.splitext(stem)
    if extension.lower() in _WEIGHT_EXTENSIONS:
        stem = root
    if not stem or stem.startswith("."):
        raise ValueError(f"output_name {output_name!r} needs a name that does not start with a dot (the Loader "
                         "does not list hidden files), e.g. kosmosg-fp16.")
    return stem + ".safetensors"


class KosmosGLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KosmosGLoader",
            display_name="Kosmos-G Loader",
            category=CATEGORY,
            description=(
                "Loads a Kosmos-G checkpoint from ComfyUI/models/kosmosg (the official checkpoint_final.pt or a "
                "converted .safetensors). The tokenizer comes from inside a converted file, else from "
                f"{' + '.join(TOKENIZER_FILENAMES)} in {tokenizer_places_text()}. Loaded "
                "models are handed to ComfyUI's memory manager, which moves them to the GPU only while encoding "
                "and frees them with its node cache."),
            search_aliases=["kosmos", "kosmosg", "subject", "mllm"],
            inputs=[
                io.Combo.Input("checkpoint", options=paths.list_files(paths.CHECKPOINT_FOLDER, paths.CHECKPOINT_EXTENSIONS),
                               tooltip="Kosmos-G checkpoint in models/kosmosg (or a 'kosmosg:' path of "
                                       "extra_model_paths.yaml): checkpoint_final.pt or a converted .safetensors."),
                io.Combo.Input("dtype", options=DTYPE_CHOICES, default="auto",
                               tooltip="Weight precision. auto: fp32 on the CPU; on a GPU bf16 where supported, "
                                       "else fp16. Choose fp32 if you see black or noisy images."),
                io.Combo.Input("device", options=device_choices(), default="auto",
                               tooltip="auto: ComfyUI's text-encoder device (GPU unless low-VRAM mode). gpu: the main "
                                       "GPU. cpu: never use the GPU (saves VRAM, slower). cuda:N (listed where there "
                                       "are several GPUs): that GPU, e.g. a second one, leaving the main GPU to the "
                                       "U-Net. The GPU copy is offloaded when the U-Net needs the memory."),
            ],
            outputs=[KosmosGModelType.Output(display_name="kosmosg_model",
                                             tooltip="The loaded Kosmos-G encoder; connect it to Kosmos-G Encode.")],
        )

    @classmethod
    def validate_inputs(cls, checkpoint=None):
        return paths.checkpoint_input_problem(checkpoint)

    @classmethod
    def fingerprint_inputs(cls, checkpoint, dtype, device):
        # Re-run (and reload) when the file on disk, or its tokenizer or config file, is replaced.
        return paths.checkpoint_fingerprint(folder_paths.get_full_path(paths.CHECKPOINT_FOLDER, checkpoint or ""))

    @classmethod
    def execute(cls, checkpoint, dtype="auto", device="auto") -> io.NodeOutput:
        path = paths.resolve_checkpoint(checkpoint)
        return io.NodeOutput(load_model(path, checkpoint, dtype, device))


class KosmosGConvertCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KosmosGConvertCheckpoint",
            display_name="Kosmos-G Convert Checkpoint",
            category=CATEGORY,
            description=(
                "Converts an official Kosmos-G checkpoint_final.pt (read safely, without running pickled code) into "
                "the pack's .safetensors format with the tokenizer inside, written next to the source in "
                "models/kosmosg. Run it once; then pick the new file in Kosmos-G Loader. Same as "
                "`python -m kosmosg_core convert`."),
            inputs=[
                io.Combo.Input("source", options=paths.list_files(paths.CHECKPOINT_FOLDER, paths.OFFICIAL_EXTENSIONS),
                               tooltip="Official .pt checkpoint in models/kosmosg; its tokenizer folder "
                                       "(sentencepiece.bpe.model + dict.txt) must be beside it."),
                io.String.Input("output_name", default="",
                                tooltip="File name for the converted checkpoint (.safetensors is added). Empty: the "
                                        "source name with .safetensors."),
                io.Combo.Input("dtype", options=CONVERT_DTYPES, default="fp16",
                               tooltip="Precision of the written weights. keep: as stored in the source file."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of the same name."),
            ],
            outputs=[io.String.Output(display_name="checkpoint",
                                      tooltip="Name of the converted file as the Loader lists it.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, source=None):
        return paths.checkpoint_input_problem(source)

    @classmethod
    def execute(cls, source, output_name="", dtype="fp16", overwrite=False) -> io.NodeOutput:
        from ..kosmosg_core.checkpoint import convert_official
        from ..kosmosg_core.devices import resolve_dtype

        src = paths.resolve_checkpoint(source)
        name = converted_file_name(source, output_name)
        # the source itself (a .safetensors source with no output_name) is refused even with overwrite
        out = str(check_output_file(os.path.join(os.path.dirname(src), name), "output_name", inputs=(src,),
                                    replace_fix=None if overwrite else "set overwrite to true"))
        convert_official(src, out, dtype=None if dtype == "keep" else resolve_dtype(dtype))
        relative = os.path.join(os.path.dirname(source), name) if os.path.dirname(source) else name
        return io.NodeOutput(relative, ui=ui.PreviewText(f"Converted {source} -> {relative}"))
