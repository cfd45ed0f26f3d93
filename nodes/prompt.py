"""Kosmos-G Interleaved Prompt: text with `<i>` placeholders + a growing list of IMAGE sockets.

Rules (also in the node description and the README):
- the n-th `<i>` in the text is filled by the n-th connected image socket (image0, image1, ...);
  the number of placeholders must equal the number of connected sockets, checked before the run;
- `weights` is a list with one number per connected image ("1.0, 0.8"; commas, semicolons or spaces between); empty
  means 1.0 for every image; a placeholder may carry its own weight, `<i:0.8>`, which multiplies with the
  list's (the encoder applies both: kosmosg_core.prompt.combine_image_weights);
- a batch of B images on one socket gives B conditionings (sample b uses image b of that socket);
  sockets holding a single image are shared by every sample; all batched sockets must hold the
  same number of images.
"""

from __future__ import annotations

import logging
import re

import torch
from comfy_api.latest import io
from comfy_execution.validation import validate_node_input

from ..kosmosg_core.config import IMAGE_PLACEHOLDER
from ..kosmosg_core.errors import ImageError, PromptError
from ..kosmosg_core.image_processing import IMAGE_CHANNELS, check_pixel_values
from ..kosmosg_core.prompt import (check_text, clip_syntax_note, combine_image_weights, parse_image_weights,
                                   placeholder_mismatch)
from .types import CATEGORY, KosmosGPrompt, KosmosGPromptType

logger = logging.getLogger(__name__)

MAX_IMAGES = 16
IMAGES_INPUT = "images"
IMAGE_PREFIX = "image"
_SOCKET_INDEX = re.compile(rf"^(?:{IMAGES_INPUT}\.)?{IMAGE_PREFIX}(\d+)$")


def parse_weights(text: str | None, num_images: int) -> list[float]:
    """The `weights` field: '1.0, 0.8' -> [1.0, 0.8]; empty -> 1.0 per image. Raises PromptError naming the problem."""
    return parse_image_weights(text, num_images, "weights", "in socket order")


def ordered_images(images: dict | None) -> list[tuple[str, torch.Tensor]]:
    """Autogrow dict {'image0': t, 'image3': t, ...} -> (socket name, image) of the connected sockets, in
    socket order. The names go into messages: a socket left empty in the middle shifts the positions."""
    found = []
    for name, value in (images or {}).items():
        match = _SOCKET_INDEX.match(name)
        if value is not None and match:
            found.append((int(match.group(1)), f"{IMAGE_PREFIX}{match.group(1)}", value))
    return [(name, value) for _, name, value in sorted(found, key=lambda item: item[0])]


def check_image_batches(images: list[tuple[str, torch.Tensor]]) -> None:
    for name, img in images:
        if not isinstance(img, torch.Tensor) or img.ndim != 4 or img.shape[-1] not in IMAGE_CHANNELS:
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            hint = " (channels first: x.permute(0, 2, 3, 1) puts them last)" if isinstance(img, torch.Tensor) and \
                img.ndim == 4 and img.shape[1] in IMAGE_CHANNELS else ""
            raise ImageError(f"{name}: expected a ComfyUI IMAGE [B, H, W, C] with C = 3 (RGB; 1, 2 or 4 are read "
                             f"too), got {shape}{hint}.")
        if img.shape[0] == 0:
            raise ImageError(f"{name} holds an empty batch (0 images); connect an image, or a batch of at least one.")
        if img.shape[1] == 0 or img.shape[2] == 0:
            raise ImageError(f"{name} holds images with no pixels (shape {tuple(img.shape)}); connect a node that "
                             "outputs real images.")
        if img.is_meta:  # a shape without values: every later read fails with "Cannot copy out of meta tensor"
            raise ImageError(f"{name} holds no pixel data (a tensor on the 'meta' device); connect a node that outputs "
                             "real images.")
    sizes = {int(img.shape[0]) for _, img in images} - {1}
    if len(sizes) > 1:
        described = ", ".join(f"{name}: {img.shape[0]}" for name, img in images)
        raise ImageError(f"Image batches of different sizes ({described}); each socket must hold 1 image or the same "
                         "number of images as the other batched sockets (one conditioning per batch sample).")


def check_image_pixels(images: list[tuple[str, torch.Tensor]]) -> None:
    """NaN / inf or out-of-range pixels, refused with the core's message after the socket's name: checked here,
    because past this node (in Encode) the images no longer carry their sockets' names."""
    for name, img in images:
        try:
            check_pixel_values(img)
        except ImageError as error:
            raise ImageError(f"{name}: {error}") from error


class KosmosGInterleavedPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        template = io.Autogrow.TemplatePrefix(
            io.Image.Input(IMAGE_PREFIX, tooltip=f"Image for the next {IMAGE_PLACEHOLDER} in the text (socket n fills "
                                                 f"the n-th {IMAGE_PLACEHOLDER}). A batch of B images makes B "
                                                 "conditionings, sample b using image b: set the latent batch to B."),
            prefix=IMAGE_PREFIX, min=0, max=MAX_IMAGES)
        return io.Schema(
            node_id="KosmosGInterleavedPrompt",
            display_name="Kosmos-G Interleaved Prompt",
            category=CATEGORY,
            description=(
                f"Builds an interleaved prompt: write {IMAGE_PLACEHOLDER} in the text where each subject image goes, "
                f"e.g. 'a photo of {IMAGE_PLACEHOLDER} wearing {IMAGE_PLACEHOLDER}'. Connect one image per "
                f"placeholder; a new image socket appears when the last one is connected. The n-th "
                f"{IMAGE_PLACEHOLDER} uses the n-th connected socket; <i:0.8> gives that image weight 0.8. Counts are "
                "checked before the run. A batch of B images on one socket gives B conditionings (sample b uses "
                "image b; single images are shared): set the latent batch (Empty Latent Image's batch_size) to B, "
                "as a smaller one uses the first conditionings only and a larger one repeats them."),
            search_aliases=["kosmos", "subject prompt", "image prompt", "interleaved"],
            inputs=[
                io.String.Input("text", multiline=True, default=f"a photo of {IMAGE_PLACEHOLDER} on the beach",
                                tooltip=f"Prompt text; write {IMAGE_PLACEHOLDER} where each connected image belongs "
                                        f"(one {IMAGE_PLACEHOLDER} per image, in socket order); <i:0.8> gives that "
                                        "image weight 0.8 (1.0 = the official model)."),
                io.Autogrow.Input(IMAGES_INPUT, template=template,
                                  tooltip=f"Subject images, one per {IMAGE_PLACEHOLDER}; up to {MAX_IMAGES}."),
                io.String.Input("weights", default="", optional=True,
                                tooltip="Optional per-image strength, comma-separated in socket order, e.g. "
                                        "'1.0, 0.7'. Empty = 1.0 for every image (the official model). Multiplies "
                                        "with a weight written in the text (<i:0.8>)."),
            ],
            outputs=[KosmosGPromptType.Output(display_name="kosmosg_prompt",
                                              tooltip="Text + images for Kosmos-G Encode.")],
        )

    @classmethod
    def validate_inputs(cls, text=None, input_types=None, images=None):
        # Runs before anything executes. Linked values are unknown here (`images` arrives as a dict of None, one
        # key per socket the prompt fills, linked or not), but `input_types` names every linked socket
        # ({"images.image0": "IMAGE", ...}), which is exactly the connected-image count.
        # ComfyUI repeats a message returned here once per argument taken (a review saw 19 copies when this took
        # **sockets), under each argument's name: hence only text and input_types (the images come with the
        # latter); the weights list is checked when the node runs, before it reads a pixel, naming it.
        # Declaring `input_types` turns off ComfyUI's own link type check for every input of the node,
        # so it is redone here, with ComfyUI's own rule, for the image sockets, text and weights.
        for name, kind in (input_types or {}).items():
            expected = "IMAGE" if _SOCKET_INDEX.match(name) else "STRING" if name in ("text", "weights") else None
            if expected and not validate_node_input(kind, expected):
                article = "an" if expected == "IMAGE" else "a"
                return f"{name} must be connected to {article} {expected} output, got {kind}."
        linked = [name for name in (input_types or {}) if _SOCKET_INDEX.match(name)]
        # a value typed into an API prompt where a link belongs: not an image, and not counted above
        literal = [f"{IMAGES_INPUT}.{name}" for name in (images or {}) if f"{IMAGES_INPUT}.{name}" not in linked]
        if literal:
            return (f"{', '.join(literal)}: not linked to an image (a value or null where a link belongs); connect "
                    "it to an IMAGE output (e.g. Load Image's) or leave it out.")
        if text is None:  # text comes from a link: checked when the node runs
            return True
        try:
            check_text(text, "text")
            combine_image_weights(text, None)  # the `<i:W>` written in the text
        except PromptError as e:
            return str(e)
        return placeholder_mismatch(text, len(linked), MAX_IMAGES) or True

    @classmethod
    def execute(cls, text, images=None, weights="", **beyond) -> io.NodeOutput:
        # an API prompt may link sockets the node lacks (image16...): ComfyUI's check leaves them out of what
        # validate_inputs sees and hands them over here as keyword arguments (else a bare TypeError)
        if beyond:
            raise PromptError(f"{', '.join(sorted(beyond))}: the prompt node takes at most {MAX_IMAGES} images, in "
                              f"sockets {IMAGE_PREFIX}0..{IMAGE_PREFIX}{MAX_IMAGES - 1}; connect the images there.")
        connected = ordered_images(images)
        check_image_batches(connected)  # first: a socket holding no image must not be counted as one
        message = placeholder_mismatch(text, len(connected), MAX_IMAGES)
        if message:
            raise PromptError(message)
        weights = parse_weights(weights, len(connected))
        combine_image_weights(text, weights)  # a bad `<i:W>` is named here, not first in Encode
        check_image_pixels(connected)  # after the cheap checks: it reads every pixel
        connected = [img[..., :3] for _, img in connected]  # drop an alpha channel if present
        note = clip_syntax_note(text)
        if note:
            logger.warning("Kosmos-G Interleaved Prompt: %s", note)
        return io.NodeOutput(KosmosGPrompt(text=text, images=connected, weights=weights))
