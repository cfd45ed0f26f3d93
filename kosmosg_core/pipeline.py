"""The user-facing encoder: interleaved prompts + images -> SD1.5 conditioning [B, 77, C].

Shared by the CLI, the ComfyUI nodes and train/eval. The user-input checks live here and in `prompt` /
`image_processing` (`_normalise_batch`: the batch's nesting and weights; `check_inputs`: one prompt with its images;
`read_prompt_images`: the same before a model loads), so every front end reports the same actionable errors.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .checkpoint import build_model, check_checkpoint_path, inspect_checkpoint, load_model, read_checkpoint
from .config import KosmosGConfig
from .cpu_linear import kernels_after_packing, linear_kernels, pack_for_cpu_encode, packs_by_default
from .disk_cache import DiskCache, checkpoint_identity, same_file_written
from .devices import canonical_device, resolve_device, resolve_dtype
from .errors import CheckpointError, CheckpointNotFoundError, NonFiniteEncodingError, PromptError
from .files import sampled_fingerprint
from .image_processing import preprocess_images, split_images, to_pil_images
from .model import KosmosG
from .prompt import PromptIds, build_prompt_ids, build_unconditional_ids, check_image_weight, check_prompt_length, \
    check_text, combine_image_weights, pad_batch, placeholder_mismatch
from .tokenizer import KosmosGTokenizer

logger = logging.getLogger(__name__)

# Big batches are encoded in chunks: memory stays bounded and `progress` (which may raise to interrupt) runs
# during the work. Images per vision forward, prompts per MLLM + aligner forward: at the official size on a 2-core
# CPU a chunk takes about 4 s (4 images; 4 prompts of one image each), so a cancel is answered within seconds (a
# GPU runs either in milliseconds).
VISION_CHUNK = 4
PROMPT_CHUNK = 4


def _as_list(value) -> list:
    """None -> [], a list / tuple -> a list, anything else (one image, one weight) -> [it]."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _normalise_batch(prompts, images, image_weights):
    """-> (list[str], list[list[image]], list[list[float]]) with one entry per prompt.

    Images are split here, not decoded (`split_images`: an IMAGE batch [B, H, W, C] counts as its B images),
    so counts are checked before any pixel is read; `image_embeddings` decodes them chunk by chunk."""
    if isinstance(prompts, str):
        prompts, images, image_weights = [prompts], [images], [image_weights]
    elif not isinstance(prompts, (list, tuple)):
        raise PromptError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}.")
    prompts = list(prompts)
    if not prompts:
        raise PromptError("No prompts were given; give a string or a non-empty list of strings.")
    for name, per_prompt in (("image lists", images), ("image weight lists", image_weights)):
        if per_prompt is not None and (not isinstance(per_prompt, (list, tuple)) or len(per_prompt) != len(prompts)):
            count = len(per_prompt) if isinstance(per_prompt, (list, tuple)) else f"a {type(per_prompt).__name__}, not"
            raise PromptError(f"Got {len(prompts)} prompts but {count} {name}; give one list per prompt (an empty "
                              "list for a text-only prompt), e.g. images=[[dog], [], [dog, hat]].")
    images = [split_images(group) if group else [] for group in map(_as_list, images or [None] * len(prompts))]
    weights = []
    for b, (group, given) in enumerate(zip(images, map(_as_list, image_weights or [None] * len(prompts)))):
        given = given or [1.0] * len(group)
        if len(given) != len(group):
            raise PromptError(f"Prompt {b} has {len(group)} image(s) but {len(given)} image weight(s); give one "
                              "weight per image (a batch [B, H, W, C] counts as B images).")
        weights.append([check_image_weight(weight, f"prompt {b}") for weight in given])
    return prompts, images, weights


def read_prompt_images(prompt: str, images: Sequence, image_weights: Sequence[float] | None = None) -> list:
    """What can be checked of one prompt and its images without a model, done before one loads (an official
    `.pt` takes seconds): the text, one `<i>` per image, the image weights (the list if given: one per image;
    any `<i:W>`; each, and their products, in range), and every image read (paths decoded, so a missing or
    damaged file is named now) -> the images as RGB PIL images, to pass to `encode` (with the same weights)."""
    check_text(prompt, "prompt")
    if isinstance(images, (list, tuple)) and not images:
        images = []
    else:  # one image or a list; a batch [B, H, W, C] is B images, as in `encode`
        images = split_images(images)
    message = placeholder_mismatch(prompt, len(images))
    if message:
        raise PromptError(message)
    _, _, (weights,) = _normalise_batch(prompt, images, image_weights)  # the weights' count and range
    combine_image_weights(prompt, weights)  # and the `<i:W>` ones, as `encode` checks them
    return to_pil_images(images) if images else []


def image_weight_list(prompt: str, images, image_weights=None) -> list[float]:
    """The image weights of one prompt as `encode` reads them: one per image (a number alone is one image's, an
    empty list or None gives 1.0 each), checked; `<i:W>` in the text not included (`combine_image_weights`)."""
    return _normalise_batch(prompt, images, image_weights)[2][0]


class _Once:
    """Calls `function` (if any) the first time it is called itself: the `before_compute` hook."""

    def __init__(self, function: Callable[[], None] | None):
        self.function, self.done = function, function is None

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.function()


class UnreadWeights:
    """A checkpoint checked, its config and tokenizer read (`checkpoint.inspect_checkpoint`), its weights not yet:
    `load()` reads them onto `device` in `dtype` (packed for CPU encodes if `pack_cpu_linears`). A pipeline built
    with `lazy=True` holds one until its model first runs, so encodings its caches hold cost no load."""

    def __init__(self, path, cfg: KosmosGConfig, dtype: torch.dtype, device: torch.device, pack_cpu_linears: bool,
                 cpu_kernel: str = "auto", identity: str | None = None, content: str | None = None):
        # absolute: a relative path would name another file after a change of working directory
        self.path, self.cfg, self.dtype = Path(path).absolute(), cfg, dtype
        self.device = canonical_device(device)  # as the weights will report it ("cpu:0" -> "cpu")
        self.pack_cpu_linears, self.cpu_kernel = pack_cpu_linears, cpu_kernel
        # the file as it was when opened (`disk_cache.checkpoint_identity`, and a sample of its bytes for when only
        # its status-change time or inode moved): loading checks it is still that file
        self.identity = identity or checkpoint_identity(path)
        self.content = content or sampled_fingerprint(self.path)
        # what `cpu_linear.linear_kernels` will say of the loaded model (packing leaves non-CPU weights plain),
        # resolved once, here: a kernel that cannot run here is refused when the checkpoint is opened, as packing would
        self._kernels = kernels_after_packing(dtype, cpu_kernel) if pack_cpu_linears and self.device.type == "cpu" \
            else "torch"

    def linear_kernels(self) -> str:
        """What `cpu_linear.linear_kernels` will say of the loaded model (the caches key by it before the load)."""
        return self._kernels

    def load(self) -> KosmosG:
        try:
            identity = checkpoint_identity(self.path)
        except OSError as e:
            raise CheckpointNotFoundError(f"Kosmos-G checkpoint {self.path} can no longer be read ({e}); it was "
                                          "there when the model was opened. Put it back, or load it again.") from e
        # the caches key by the identity read when it was opened. A hard link, a chmod or a remount moves only the
        # status-change time or inode: the same bytes still load; `cp -p` of another file over it does not
        unchanged = identity == self.identity or (same_file_written(identity, self.identity)
                                                  and sampled_fingerprint(self.path) == self.content)
        if not unchanged:
            raise CheckpointError(f"Kosmos-G checkpoint {self.path} changed on disk after the model was opened (its "
                                  "size, modification time or bytes differ); load it again (ComfyUI: run the workflow again, "
                                  "the Loader re-reads a replaced file).")
        logger.info("Kosmos-G: reading the weights of %s (%s, %s)", self.path, self.dtype, self.device)
        _, state_dict, _ = read_checkpoint(self.path, self.cfg)
        model = build_model(self.cfg, state_dict, self.path, self.dtype, self.device)
        if self.pack_cpu_linears:
            pack_for_cpu_encode(model, kernel=self.cpu_kernel)
        return model


class KosmosGPipeline:
    """Encoder pipeline around a `KosmosG` model and its tokenizer.

    Vision features are cached by image content (preprocessed pixels), so a repeated subject image
    is encoded once; the cache holds at most `cache_size` images. Unconditional encodings (`<s>` or a
    negative prompt: the same for every positive prompt) are cached by text, at most `cache_size` too.
    Both caches are keyed by the model and how it computes (`model_key`: identity, config, dtype, device,
    kernels); call `clear_cache` after changing its weights.

    model_identity: what made the weights (`from_checkpoint`: `disk_cache.checkpoint_identity` of the file), part
        of every cache key; needed for a `DiskCache`, which keeps encodings across restarts. Give one that changes
        whenever the weights do.
    compute_device: where the model computes when it is moved there only to compute (ComfyUI offloads it between
        runs), so that the caches key by that device; None (default): wherever its weights are at the time.

    `model` may be `UnreadWeights` (`from_checkpoint(lazy=True)`): the weights are read when the model first runs
    (`model`, `load`), not when every encoding asked for is in a cache.
    """

    def __init__(self, model: KosmosG | UnreadWeights, tokenizer: KosmosGTokenizer, cache_size: int = 64,
                 model_identity: str | None = None, compute_device: torch.device | None = None):
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be a whole number >= 0 (0 = no caching), got {cache_size!r}.")
        self._model, self._unread = (None, model) if isinstance(model, UnreadWeights) else (model.eval(), None)
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self.model_identity = model_identity
        self.compute_device = compute_device
        self._image_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._unconditional_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    @classmethod
    def from_checkpoint(cls, path, tokenizer_dir=None, dtype="float32", device="cpu", config=None,
                        cache_size: int = 64, pack_cpu_linears: bool | None = None,
                        cpu_kernel: str = "auto", lazy: bool = False) -> "KosmosGPipeline":
        """Load a checkpoint (official .pt or pack .safetensors) and its tokenizer.

        pack_cpu_linears: pre-pack the linear weights (`cpu_linear.pack_for_cpu_encode`), faster encodes on
            the CPU; None = `cpu_linear.packs_by_default(device, dtype)`: on the CPU in float32, or in bfloat16
            where it has native bf16. Leave it off for a model that will be moved to a GPU later.
        cpu_kernel: the decoder's and aligner's kernel when packing: "auto" (the few-row kernel where it
            builds, else oneDNN), "onednn" or "few-row" (`cpu_linear`), for the layers that multiply the prompt's
            tokens; the others (vision tower, connector, the aligner's 77 queries) use oneDNN.
        lazy: check the file and read its config and tokenizer now (every error but damaged tensor data is raised
            here), the weights when the model first runs: never, when the caches (a `DiskCache`) hold every
            encoding asked for."""
        dtype, device = resolve_dtype(dtype), resolve_device(device)
        if pack_cpu_linears is None:
            pack_cpu_linears = packs_by_default(device, dtype)
        identity = checkpoint_identity(check_checkpoint_path(path))  # before reading: what the caches key by
        if lazy:
            content = sampled_fingerprint(path)  # with the identity: the bytes the config and tokenizer come from
            cfg, tokenizer = inspect_checkpoint(path, tokenizer_dir=tokenizer_dir, config=config)
            model = UnreadWeights(path, cfg, dtype, device, pack_cpu_linears, cpu_kernel, identity, content)
        else:
            model, tokenizer = load_model(Path(path), tokenizer_dir=tokenizer_dir, dtype=dtype, device=device,
                                          config=config)
            if pack_cpu_linears:
                pack_for_cpu_encode(model, kernel=cpu_kernel)
        # the tokenizer is not part of it: the keys hold the token ids
        return cls(model, tokenizer, cache_size=cache_size, model_identity=identity)

    # --- the model and its properties -------------------------------------------------------------
    @property
    def model(self) -> KosmosG:
        """The model; a lazy pipeline's weights are read here, the first time."""
        if self._model is None:
            self._model = self._unread.load().eval()
            self._unread = None
        return self._model

    @property
    def is_loaded(self) -> bool:
        """Whether the weights are read (always, unless built with `lazy=True` and not run yet)."""
        return self._model is not None

    def load(self) -> KosmosG:
        """Read the weights now if they are not (a lazy pipeline) -> the model."""
        return self.model

    @property
    def cfg(self) -> KosmosGConfig:
        return self._model.cfg if self._model is not None else self._unread.cfg

    @property
    def device(self) -> torch.device:
        return next(self._model.parameters()).device if self._model is not None else self._unread.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self._model.parameters()).dtype if self._model is not None else self._unread.dtype

    @property
    def context_dim(self) -> int:
        return self.cfg.aligner.width

    def _check_length(self, ids: PromptIds, what: str) -> None:
        """Refuse a sequence the model cannot read; warn about one past what it was trained on (the official code
        encodes it, without a word)."""
        check_prompt_length(ids, self.cfg.max_readable_tokens, what)
        if len(ids.ids) > self.cfg.max_prompt_tokens:
            logger.warning("The %s is %d tokens long (image slots included: %d), past the %d the model was trained "
                           "on: it is encoded as the official code encodes it, but may come out worse; shorten the "
                           "text%s.", what, len(ids.ids), ids.num_image_slots, self.cfg.max_prompt_tokens,
                           " or use fewer images" if ids.num_image_slots else "")

    # --- checks --------------------------------------------------------------------------------
    def check_inputs(self, prompt: str, images: Sequence) -> PromptIds:
        """Validate one prompt against its images and the model's limits -> its token ids."""
        check_text(prompt, "prompt")
        ids = build_prompt_ids(self.tokenizer, prompt, len(images), image_slots=self.cfg.image_token_slots)
        self._check_length(ids, "prompt")
        return ids

    # --- encoding ------------------------------------------------------------------------------
    def model_key(self) -> str:
        """The model as the caches key it: what made its weights, its config (an official file's head counts come
        from a sidecar file or an argument), its dtype, and where and how it computes (the device and its kind,
        torch's version, the linear layers' kernels): values computed another way differ in the last bits, and a
        cache hit must give what computing would."""
        # "cuda" names the same GPU as the weights' "cuda:0"
        device = canonical_device(self.compute_device if self.compute_device is not None else self.device)
        if device.type == "cuda":
            index = device.index
            device_kind = f"{torch.cuda.get_device_name(index)} sm{''.join(map(str, torch.cuda.get_device_capability(index)))}"
        elif device.type == "cpu":
            device_kind = torch.backends.cpu.get_cpu_capability()
        else:
            device_kind = ""
        config = hashlib.sha256(self.cfg.to_json().encode()).hexdigest()[:16]
        kernels = linear_kernels(self._model) if self._model is not None else self._unread.linear_kernels()
        return "|".join([self.model_identity or "", f"config {config}", str(self.dtype), str(device), device_kind,
                         f"torch {torch.__version__}", kernels])

    def _disk_key(self, disk_cache: DiskCache, model_key: str, kind: str, *content) -> str:
        if self.model_identity is None:
            raise ValueError("A disk cache needs the pipeline's model_identity (what made the weights): load with "
                             "KosmosGPipeline.from_checkpoint, or give model_identity.")
        return disk_cache.key(kind, model_key, *content)

    def _cached_tensor(self, disk_cache: DiskCache, key: str, shape: tuple) -> torch.Tensor | None:
        """A disk-cached tensor when it has the shape and dtype this model computes, else None (recompute)."""
        tensor = disk_cache.get(key)
        if tensor is None or tuple(tensor.shape) != tuple(shape) or tensor.dtype != self.dtype:
            return None
        return tensor

    def _pixels_and_digests(self, images: Sequence) -> tuple[torch.Tensor, list[str]]:
        """Images -> the model's input pixels [N, 3, S, S] and each one's SHA-256 (the caches' content key)."""
        pixels = preprocess_images(list(images), self.cfg.vision.image_size)
        return pixels, [hashlib.sha256(pixel.numpy().tobytes()).hexdigest() for pixel in pixels]

    @torch.inference_mode()
    def image_embeddings(self, images: Sequence, progress: Callable[[], None] | None = None,
                         disk_cache: DiskCache | None = None,
                         before_compute: Callable[[], None] | None = None) -> torch.Tensor:
        """Images (anything `to_pil_images` reads) -> connector outputs [N, Q, D], content-cached (in memory;
        on disk too with a `disk_cache`). before_compute: called once before the vision tower runs, not at
        all when every image is cached (ComfyUI loads the model onto the GPU there)."""
        if not images:
            cfg = self.cfg
            return torch.zeros(0, cfg.image_token_slots, cfg.decoder.width, dtype=self.dtype, device=self.device)
        pixels, digests = self._pixels_and_digests(images)
        return self._image_embeddings(pixels, digests, self.model_key(), progress, disk_cache, _Once(before_compute))

    def _image_embeddings(self, pixels: torch.Tensor, digests: list[str], model_key: str, progress,
                          disk_cache: DiskCache | None, before_compute: _Once) -> torch.Tensor:
        cfg = self.cfg
        keys = [f"{digest}|{model_key}" for digest in digests]
        first_index: dict[str, int] = {}  # images to encode: cache key -> index of its first occurrence
        disk_keys: dict[str, str] = {}
        for i, key in enumerate(keys):
            if key in first_index or key in disk_keys:
                continue
            if disk_cache is not None:
                disk_keys[key] = self._disk_key(disk_cache, model_key, "vision", digests[i])
            if key in self._image_cache:
                if disk_cache is not None:  # computed while no disk cache was given: kept there from now on
                    disk_cache.put_if_missing(disk_keys[key], self._image_cache[key])
                continue
            if disk_cache is not None:
                cached = self._cached_tensor(disk_cache, disk_keys[key], (cfg.image_token_slots, cfg.decoder.width))
                if cached is not None:
                    self._image_cache[key] = cached
                    continue
            first_index[key] = i
        new = list(first_index.items())
        if new:
            before_compute()
            self.load()  # a lazy pipeline reads its weights now (before_compute may have: ComfyUI's load does)
        for start in range(0, len(new), VISION_CHUNK):
            chunk = new[start:start + VISION_CHUNK]
            batch = pixels[[i for _, i in chunk]].to(device=self.device, dtype=self.dtype)  # [M, 3, S, S]
            # kept on the CPU (GPU memory belongs to the model: ComfyUI offloads it between runs), each entry in
            # its own storage: a view would keep the whole chunk's output alive for as long as it is cached
            for (key, _), embeds in zip(chunk, self.model.encode_images(batch).cpu()):  # [Q, D] each
                self._image_cache[key] = embeds.clone()
                if disk_cache is not None:
                    disk_cache.put(disk_keys[key], self._image_cache[key])
            if progress is not None:
                for _ in chunk:
                    progress()
        out = []
        for key in keys:
            self._image_cache.move_to_end(key)
            out.append(self._image_cache[key])
        if progress is not None:
            for _ in range(len(keys) - len(new)):  # repeated or cached images
                progress()
        while len(self._image_cache) > self.cache_size:
            self._image_cache.popitem(last=False)
        return torch.stack(out).to(self.device)

    @torch.inference_mode()
    def encode_ids(self, prompt_ids: list[PromptIds], image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token ids (+ image embeddings [N, Q, D] for all prompts, in order) -> [B, 77, C]."""
        model = self.load()  # before self.device: where the weights are once read
        input_ids, image_mask = pad_batch(prompt_ids)
        input_ids, image_mask = input_ids.to(self.device), image_mask.to(self.device)
        if image_embeds is not None:  # read from a cache while the model was elsewhere (ComfyUI: offloaded)
            image_embeds = image_embeds.to(self.device)
        cond = model(input_ids, image_mask, image_embeds=image_embeds)  # [B, 77, C]
        if not torch.isfinite(cond).all():  # NaN conditioning would give black images, silently
            fix = ("float16 overflowed: load the model in bfloat16 or float32 (ComfyUI: the Kosmos-G Loader's dtype)"
                   if cond.dtype == torch.float16 else
                   "the checkpoint's weights may hold inf/NaN: convert or download it again")
            raise NonFiniteEncodingError(f"The Kosmos-G encoding came out inf/NaN in {str(cond.dtype).split('.')[-1]}; {fix}.")
        return cond

    def encode(self, prompts, images=None, image_weights=None, progress: Callable[[], None] | None = None,
               disk_cache: DiskCache | None = None, before_compute: Callable[[], None] | None = None) -> torch.Tensor:
        """Interleaved prompt(s) + images -> conditioning [B, 77, C] (model dtype, model device).

        prompts: a string, or a list of B strings with `<i>` where each image goes.
        images: for one prompt, its image or a list of its images; for B prompts, B lists (or one image
            each). Anything `to_pil_images` reads; a batch [N, H, W, C] counts as N images.
        image_weights: same nesting as images; each multiplies its image's slot embeddings
            (1.0 = the official model), as does a weight written in the text (`<i:0.8>`; the two multiply:
            `prompt.combine_image_weights`). Prompts of different lengths batch to the same result as
            one at a time (right padding; the MLLM is causal and the aligner masks pads).
        progress: called once per image (when its features are ready) and once per encoded prompt (for
            progress bars; it may raise to interrupt). Prompts are encoded PROMPT_CHUNK at a time, so
            memory stays bounded and progress runs during the work, whatever the batch size.
        disk_cache: also keep (and look up) the encodings and image features there (`DiskCache`): a chunk of
            prompts encoded before, even by an earlier process, is read back bit for bit without the model.
        before_compute: called once before the model first runs, not at all when everything is cached."""
        prompts, images, image_weights = _normalise_batch(prompts, images, image_weights)
        prompt_ids = [self.check_inputs(prompt, prompt_images) for prompt, prompt_images in zip(prompts, images)]
        image_weights = [combine_image_weights(prompt, weights) for prompt, weights in zip(prompts, image_weights)]
        before_compute = _Once(before_compute)
        model_key = self.model_key()  # once per call: it hashes the config and walks the layers
        conds = []
        for start in range(0, len(prompt_ids), PROMPT_CHUNK):
            chunk = slice(start, start + PROMPT_CHUNK)
            flat_images = [img for group in images[chunk] for img in group]
            flat_weights = [w for group in image_weights[chunk] for w in group]
            pixels, digests = self._pixels_and_digests(flat_images) if flat_images else (None, [])
            disk_key = None
            if disk_cache is not None:  # per chunk: a batch's numbers differ from one prompt's in the last bits
                disk_key = self._disk_key(disk_cache, model_key, "encoding", [ids.ids for ids in prompt_ids[chunk]],
                                          [ids.image_mask for ids in prompt_ids[chunk]], digests, flat_weights)
                cond = self._cached_tensor(disk_cache, disk_key,
                                           (len(prompt_ids[chunk]), self.cfg.aligner.num_queries, self.context_dim))
                if cond is not None:
                    conds.append(cond)
                    if progress is not None:
                        for _ in range(len(flat_images) + len(prompt_ids[chunk])):
                            progress()
                    continue
            image_embeds = None
            if flat_images:
                image_embeds = self._image_embeddings(pixels, digests, model_key, progress, disk_cache,
                                                      before_compute)  # [N, Q, D]
                weights = torch.tensor(flat_weights, dtype=torch.float32)
                if not torch.all(weights == 1.0):
                    image_embeds = image_embeds * weights.to(image_embeds)[:, None, None]
            before_compute()
            conds.append(self.encode_ids(prompt_ids[chunk], image_embeds))
            if disk_key is not None:
                disk_cache.put(disk_key, conds[-1])
            if progress is not None:
                for _ in prompt_ids[chunk]:
                    progress()
        # on the model's device, also chunks read from the disk cache before the model was moved to compute
        return torch.cat([cond.to(self.device) for cond in conds])

    def encode_unconditional(self, negative_prompt: str = "", batch_size: int = 1,
                             disk_cache: DiskCache | None = None,
                             before_compute: Callable[[], None] | None = None) -> torch.Tensor:
        """The official classifier-free-guidance condition: MLLM + aligner on `<s>` (or `<s>` + negative
        prompt, official `encode_condition`) -> [batch_size, 77, C]. Cached: computed once per text (and kept
        in `disk_cache` if given); before_compute: called before the model runs, not when it is cached."""
        negative_prompt = "" if negative_prompt is None else negative_prompt
        check_text(negative_prompt, "negative prompt")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise PromptError(f"batch_size must be a whole number >= 1, got {batch_size!r}.")
        ids = build_unconditional_ids(self.tokenizer, negative_prompt)
        self._check_length(ids, "negative prompt")
        model_key = self.model_key()
        key = (negative_prompt, model_key)
        cond = self._unconditional_cache.get(key)
        disk_key = None if disk_cache is None else self._disk_key(disk_cache, model_key, "unconditional", ids.ids,
                                                                   ids.image_mask)
        if cond is not None and disk_key is not None:  # computed while no disk cache was given: kept there now
            disk_cache.put_if_missing(disk_key, cond)
        if cond is None and disk_key is not None:
            cond = self._cached_tensor(disk_cache, disk_key, (1, self.cfg.aligner.num_queries, self.context_dim))
        if cond is None:
            if before_compute is not None:
                before_compute()
            cond = self.encode_ids([ids], None)  # [1, 77, C]
            if disk_key is not None:
                disk_cache.put(disk_key, cond)
        # kept on the CPU, as the image features are: GPU memory belongs to the model (ComfyUI offloads it)
        self._unconditional_cache[key] = cond = cond.cpu()
        self._unconditional_cache.move_to_end(key)
        while len(self._unconditional_cache) > self.cache_size:
            self._unconditional_cache.popitem(last=False)
        # a fresh tensor on the model's device: callers may modify what they get
        return cond.to(self.device).expand(batch_size, -1, -1).clone()

    def clear_cache(self) -> None:
        self._image_cache.clear()
        self._unconditional_cache.clear()
