"""Kosmos-G Encode: model + interleaved prompt -> positive / negative CONDITIONING for SD1.5.

Output format (what CLIPTextEncode gives, so every stock node accepts it):
    [[cond [B, 77, C] float32 on intermediate_device(), {"pooled_output": [B, C], "kosmosg": {...}}]]
- B = the prompt's batch size (1 unless a socket carries an image batch);
- pooled_output = the mean of the 77 context vectors. SD1.5 sampling never reads it; it is there
  so nodes that blend or zero pooled vectors (ConditioningAverage, ZeroOut) behave as with CLIP;
- "kosmosg" = plain metadata (prompt text, image count, weights, model name) for Save Conditioning;
- negative = the official unconditional encoding (`<s>` + negative text through the MLLM and the
  aligner), repeated to B.
"""

from __future__ import annotations

import logging

import comfy.model_management as mm
import comfy.utils
import torch
from comfy_api.latest import io

from ..kosmosg_core.config import DISK_CACHE_MAX_BYTES
from ..kosmosg_core.disk_cache import DiskCache
from ..kosmosg_core.errors import PromptError
from ..kosmosg_core.prompt import check_negative_prompt, combine_image_weights
from .disk_cache import SIZE_VARIABLE, shared_disk_cache
from .model_management import KosmosGModel
from .types import CATEGORY, KosmosGModelType, KosmosGPrompt, KosmosGPromptType

logger = logging.getLogger(__name__)

MAX_CACHED_ENCODINGS = 16  # per model (KosmosGModel.encodings)
MAX_CACHED_BYTES = 256 * 2**20  # and at most this much tensor data (big batches are 100s of MB each)


def _cached_bytes(encodings: dict) -> int:
    return sum(t.numel() * t.element_size() for pair in encodings.values() for conditioning in pair
               for cond, extras in conditioning for t in (cond, extras["pooled_output"]))


def to_conditioning(context: torch.Tensor, metadata: dict) -> list:
    """[B, 77, C] (any dtype/device) -> ComfyUI CONDITIONING with one entry."""
    context = context.to(device=mm.intermediate_device(), dtype=torch.float32)
    return [[context, {"pooled_output": context.mean(dim=1), "kosmosg": dict(metadata)}]]


def encode_prompt(model: KosmosGModel, prompt: KosmosGPrompt, negative_text: str,
                  cache: DiskCache | None = None) -> tuple[list, list]:
    """Run the pipeline under the memory manager with a progress bar; interruptible between steps. The model
    goes to its load device only when something is computed: not when `cache` (a DiskCache) holds it all."""
    batch = prompt.batch_size
    num_images = len(prompt.images)
    pbar = comfy.utils.ProgressBar(batch * num_images + batch + 1)  # each image, each positive prompt, the negative

    def step():
        mm.throw_exception_if_processing_interrupted()
        pbar.update(1)

    mm.throw_exception_if_processing_interrupted()
    pipeline = model.pipeline
    computed = []

    def load_for_encoding():  # the pipeline calls it before the model runs: never when the disk cache holds it all
        computed.append(True)
        model.load_for_encoding()
    texts = [prompt.text] * batch
    images = [prompt.images_for_sample(b) for b in range(batch)]
    weights = [list(prompt.weights) for _ in range(batch)]
    with torch.inference_mode():
        positive = pipeline.encode(texts, images, image_weights=weights, progress=step, disk_cache=cache,
                                   before_compute=load_for_encoding)  # [B, 77, C]
        mm.throw_exception_if_processing_interrupted()
        try:
            negative = pipeline.encode_unconditional(negative_text, batch_size=batch, disk_cache=cache,
                                                     before_compute=load_for_encoding)  # [B, 77, C]
        except PromptError as error:  # e.g. too long: say which of the node's texts it is
            raise PromptError(f"negative_text: {error}") from error
        step()
    if cache is not None and not computed:
        logger.info("Kosmos-G Encode: read from the disk cache in %s (the model was not run)", cache.directory)
    metadata = {"model": model.name, "num_images": num_images,
                "weights": combine_image_weights(prompt.text, prompt.weights)}  # the list's times the text's `<i:W>`
    return (to_conditioning(positive, {**metadata, "text": prompt.text}),
            to_conditioning(negative, {**metadata, "text": negative_text, "num_images": 0, "weights": [],
                                       "unconditional": True}))


class KosmosGEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KosmosGEncode",
            display_name="Kosmos-G Encode",
            category=CATEGORY,
            description=(
                "Encodes an interleaved prompt into SD1.5 conditioning ([B, 77, 768], like CLIP Text Encode), so it "
                "works with KSampler, ControlNet, LoRA-patched models and the Conditioning nodes. The negative output "
                "is Kosmos-G's own unconditional encoding (use it as KSampler's negative). pooled_output is the mean "
                "of the 77 vectors (unused by SD1.5). Results are cached while the inputs are unchanged, and on disk "
                "across restarts (disk_cache)."),
            search_aliases=["kosmos", "subject", "conditioning"],
            inputs=[
                KosmosGModelType.Input("model", tooltip="Kosmos-G model from Kosmos-G Loader."),
                KosmosGPromptType.Input("prompt", tooltip="Text + images from Kosmos-G Interleaved Prompt."),
                io.String.Input("negative_text", multiline=True, default="", optional=True,
                                tooltip="Optional text for the negative conditioning (no <i>). Empty = the official "
                                        "unconditional encoding."),
                io.Boolean.Input("disk_cache", default=True, optional=True,
                                 tooltip="Keep encodings and image features on disk (__kosmosg_cache in ComfyUI's user folder, "
                                         f"at most {DISK_CACHE_MAX_BYTES >> 30} GiB, least recently used dropped "
                                         "first), so the same prompt and images are not encoded again after a "
                                         "restart. Keyed by the checkpoint file, dtype and device. Size limit for "
                                         f"every workflow: the environment variable {SIZE_VARIABLE} "
                                         "(GiB, 0 = off)."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive",
                                       tooltip="Kosmos-G conditioning [B, 77, 768] (SD1.5 models only); connect to "
                                               "KSampler positive, with a latent batch of B."),
                io.Conditioning.Output(display_name="negative",
                                       tooltip="Unconditional (or negative-text) encoding; connect to KSampler "
                                               "negative."),
            ],
        )

    @classmethod
    def validate_inputs(cls, negative_text=None):
        try:
            check_negative_prompt(negative_text or "")  # before the Loader runs
        except PromptError as e:
            return str(e)  # ComfyUI writes "negative_text - " before it
        return True

    @classmethod
    def execute(cls, model, prompt, negative_text="", disk_cache=True) -> io.NodeOutput:
        negative_text = negative_text or ""
        # ComfyUI already caches this node's output while its inputs are unchanged; this content-keyed
        # cache also covers re-executed upstream nodes that produce the same pixels.
        # with the disk_cache flag: turned on, the next run puts what memory holds on disk
        # kept with the model: freed with it (ComfyUI's "free model and node cache" drops the Loader's output)
        cache, key = model.encodings, (prompt.fingerprint(), negative_text, bool(disk_cache))
        if key in cache:
            cache.move_to_end(key)
            positive, negative = cache[key]
        else:
            positive, negative = encode_prompt(model, prompt, negative_text,
                                               shared_disk_cache() if disk_cache else None)
            cache[key] = (positive, negative)
            while len(cache) > MAX_CACHED_ENCODINGS or (len(cache) > 1 and _cached_bytes(cache) > MAX_CACHED_BYTES):
                cache.popitem(last=False)
        # fresh outer lists and dicts each run: downstream nodes may copy/extend them
        return io.NodeOutput([[t, d.copy()] for t, d in positive], [[t, d.copy()] for t, d in negative])
