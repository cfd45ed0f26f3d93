"""Interleaved prompt (`text <i> text <i> ...`) -> token ids + image-slot mask, official layout.

Layout (official `AppModel.kosmosg_preprocess`, spec section 5), for n images and S slots:

    [<s>] text_1 [<image>] [<image>]*S [</image>] text_2 ... [<image>] [<image>]*S [</image>] tail

- text_k is the text before the k-th `<i>`, found by splitting once, left to right. Each segment
  is encoded *separately* and *as is*: the official code strips nothing, so "a <i> b" encodes
  "a " and " b" as two independent texts and whitespace is left to SentencePiece's normaliser
  (with its default `remove_extra_whitespaces`, leading / trailing / repeated spaces vanish and
  each non-empty segment gets its own dummy `▁` prefix). An empty segment (`<i>` at the start,
  adjacent `<i><i>`, `<i>` at the end) encodes to no tokens at all, and so does a whitespace-only
  one under that default.
- the first `<image>` of each group is a real token (mask 0); the S slots after it also carry the
  `<image>` id but are marked 1 in the mask: the model overwrites their embeddings with the S
  connector outputs of that image, images in prompt order; `</image>` is a real token (mask 0).
- no `</s>` at the end. Length = 1 + sum(len(text_k)) + (S + 2) * n + len(tail).

A placeholder may carry its image's weight, `<i:0.8>` (this pack's addition; the official format has `<i>`
only): the tokens are those of `<i>`, and the weight multiplies the image's slot embeddings as a weights list
does (`<i:1>` is `<i>`). Both can be given: an image's weight is its `<i:w>` times its list entry.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .config import BOS_ID, IMAGE_PLACEHOLDER, MAX_IMAGE_WEIGHT, PAD_ID, PLACEHOLDER_PATTERN, KosmosGConfig
from .errors import PromptError


@dataclass
class PromptIds:
    """One prompt's token ids and its image-slot mask (True where an image feature goes)."""

    ids: list[int]
    image_mask: list[bool] = field(default_factory=list)

    def __post_init__(self):
        if not self.image_mask:
            self.image_mask = [False] * len(self.ids)
        if len(self.image_mask) != len(self.ids):
            raise ValueError(f"PromptIds: {len(self.ids)} ids but {len(self.image_mask)} mask entries.")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_image_slots(self) -> int:
        return sum(self.image_mask)


# Image weights as people write them, read the same way by web/js/kosmosg_prompt.js: 0.8, 1, 1., .5 (ASCII digits,
# a sign that the range check then judges; no exponent, digit separator or words), with spaces around it in
# `<i: 0.8 >`; a weights list's numbers separated by commas, semicolons or white space (the characters both
# Python's and JavaScript's `\s` take).
_NUMBER = r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_EXPONENT_NUMBER = re.compile(rf" *{_NUMBER}[eE][-+]?[0-9]+ *")  # 1e-3: refused, with its own message
_PLACEHOLDER_WEIGHT = re.compile(rf" *{_NUMBER} *")
_LIST_WEIGHT = re.compile(_NUMBER)
_LIST_SEPARATORS = re.compile(r"[,;\s\x1c-\x1f\x85\ufeff]+")


def count_placeholders(text: str) -> int:
    """Number of `<i>` / `<i:W>` placeholders in `text` (non-overlapping, left to right)."""
    check_text(text, "prompt")
    return sum(1 for _ in PLACEHOLDER_PATTERN.finditer(text))


def split_placeholders(text: str) -> tuple[list[str], list[float]]:
    """'a <i:0.5> b <i>' -> (['a ', ' b ', ''], [0.5, 1.0]): the n + 1 texts around the n placeholders, and the
    weight each placeholder writes (1.0 for plain `<i>`). A weight that is not a number in 0..MAX_IMAGE_WEIGHT
    is a PromptError naming the placeholder."""
    check_text(text, "prompt")
    segments, weights, start = [], [], 0
    for number, match in enumerate(PLACEHOLDER_PATTERN.finditer(text), start=1):
        segments.append(text[start:match.start()])
        start = match.end()
        written = match.group(1)
        if written is None:
            weights.append(1.0)
            continue
        if _EXPONENT_NUMBER.fullmatch(written):
            raise PromptError(f"Placeholder {number} of the prompt, {match.group(0)!r}, writes its weight with an "
                              f"exponent; write it as a plain decimal in 0..{MAX_IMAGE_WEIGHT:g}, e.g. <i:0.8>.")
        if not _PLACEHOLDER_WEIGHT.fullmatch(written):
            raise PromptError(f"Placeholder {number} of the prompt, {match.group(0)!r}, has no weight Kosmos-G can "
                              f"read; write {IMAGE_PLACEHOLDER} or a number in 0..{MAX_IMAGE_WEIGHT:g} after "
                              "the colon, e.g. <i:0.8>.")
        weights.append(check_image_weight(float(written), f"placeholder {number}, {match.group(0)}"))
    segments.append(text[start:])
    return segments, weights


def combine_image_weights(text: str, weights: Sequence[float] | None) -> list[float]:
    """Each image's weight: its placeholder's `<i:W>` (1.0 for `<i>`) times its entry in `weights` (None: 1.0
    each), checked to stay within 0..MAX_IMAGE_WEIGHT. `weights` must hold one number per placeholder."""
    _, written = split_placeholders(text)
    weights = [1.0] * len(written) if weights is None else list(weights)
    if len(weights) != len(written):
        raise PromptError(f"The prompt has {len(written)} placeholder(s) but {len(weights)} image weight(s) were "
                          "given; give one weight per image.")
    combined = []
    for number, (in_text, given) in enumerate(zip(written, weights), start=1):
        where = f"image {number}: {in_text:g} written in the text x {given:g} given as its weight"
        combined.append(check_image_weight(in_text * given, where))
    return combined


def placeholder_mismatch(text: str, num_images: int, max_images: int | None = None) -> str | None:
    """None when `text` holds one `<i>` per image, else the message (which count is higher, and the fix).
    `max_images`: the most images the caller takes (ComfyUI's prompt node: its sockets), past which the fix is
    only removing placeholders."""
    placeholders = count_placeholders(text)
    if placeholders == num_images:
        return None
    if max_images is not None and placeholders > max_images:
        fix = f"at most {max_images} images can be connected: remove {placeholders - max_images} {IMAGE_PLACEHOLDER}"
    elif placeholders > num_images:
        fix = f"add an image or remove a {IMAGE_PLACEHOLDER}"
    else:
        fix = f"add a {IMAGE_PLACEHOLDER} where each image belongs, or remove an image"
    # `<i:...>` (an image with its weight) counts too: said when the text holds one, which may be meant as text
    weighted = " (a <i:...> is a placeholder too)" if any(
        match.group(1) is not None for match in PLACEHOLDER_PATTERN.finditer(text)) else ""
    return (f"The prompt has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s){weighted} but {num_images} image(s) "
            f"were given; {fix} (one {IMAGE_PLACEHOLDER} per image, in order).")


# ComfyUI's CLIP prompt syntax: "(photo:1.3)" weights and "embedding:name" textual inversions. Kosmos-G's
# tokenizer reads them as plain characters; only images take weights here (`<i:W>`).
# A whole number after a digit and a colon is a time or a ratio ("(at 10:30)", "(16:9)"), not a weight; a decimal
# weight ("(1990:1.2)") or one after a word ("(photo:1)") is.
CLIP_PROMPT_SYNTAX = re.compile(rf"\([^()<>]*(?:[^\d\s:()<>]\s*:\s*{_NUMBER}|:\s*[-+]?[0-9]*\.[0-9]+)\s*\)"
                                r"|\bembedding:\S+")


def clip_syntax_note(text: str) -> str | None:
    """A note when `text` holds ComfyUI's CLIP prompt syntax, which Kosmos-G encodes as literal text; else None."""
    found = CLIP_PROMPT_SYNTAX.search(text)
    if found is None:
        return None
    return (f"{found.group(0)!r} is CLIP-text-encoder syntax (a weight or an embedding), which Kosmos-G reads as "
            "plain text; weight subject images with <i:W> or the weights list, and mix CLIP text in through "
            "Conditioning (Concat).")


def check_image_weight(weight, where: str) -> float:
    """`weight` as a float if it is a number in 0..MAX_IMAGE_WEIGHT, else a PromptError naming `where` it came from."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise PromptError(f"Image weight {weight!r} ({where}) is not a finite number; use e.g. 1.0 (the official "
                          "model) or 0.5.")
    if not 0.0 <= weight <= MAX_IMAGE_WEIGHT:
        raise PromptError(f"Image weight {weight:.10g} ({where}) is outside 0..{MAX_IMAGE_WEIGHT:g}; 1.0 is the official "
                          "strength, 0 removes the image's features.")
    return float(weight)


def parse_image_weights(text: str | None, num_images: int, name: str, order: str) -> list[float]:
    """'1.0, 0.8' -> [1.0, 0.8] (commas, semicolons or white space between numbers); None, or white space only,
    -> 1.0 per image (a comma alone is 0 values). A PromptError names `name` (the input the text came from) and,
    for a wrong count, says to give one weight per image `order` (e.g. "in socket order")."""
    text = text or ""
    parts = [part for part in _LIST_SEPARATORS.split(text) if part]
    if not parts and "," not in text and ";" not in text:  # blank: no number, no separator written
        return [1.0] * num_images
    weights = []
    for part in parts:
        if _EXPONENT_NUMBER.fullmatch(part):
            raise PromptError(f"{name}: {part!r} is written with an exponent; write each weight as a plain decimal "
                              f"in 0..{MAX_IMAGE_WEIGHT:g}, e.g. '1.0, 0.8'.")
        if not _LIST_WEIGHT.fullmatch(part):
            raise PromptError(f"{name}: {part!r} is not a number; write one number per image, e.g. '1.0, 0.8'.")
        value = float(part)
        weights.append(check_image_weight(value, name))
    if len(weights) != num_images:
        raise PromptError(f"{name} has {len(weights)} value(s) but {num_images} image(s) were given; give one weight "
                          f"per image {order}, or leave {name} empty for 1.0 each.")
    return weights


def check_text(text, what: str) -> None:
    """A prompt must be a str that encodes as UTF-8 (a lone surrogate, e.g. from undecodable bytes in argv, cannot)."""
    if not isinstance(text, str):
        raise PromptError(f"The {what} must be text, got {type(text).__name__}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"The {what} holds bytes that are not valid text (at character {e.start}); write it as "
                          "UTF-8 text.") from e


def check_negative_prompt(text: str) -> None:
    """A PromptError unless `text` is text without `<i>` (the unconditional input takes no images)."""
    check_text(text, "negative prompt")
    placeholder = PLACEHOLDER_PATTERN.search(text)
    if placeholder:
        raise PromptError(f"The negative prompt contains {placeholder.group(0)}; negative prompts are text only: "
                          "remove the placeholder.")


def build_prompt_ids(tokenizer, text: str, num_images: int,
                     image_slots: int = KosmosGConfig.image_token_slots) -> PromptIds:
    """Official interleaved layout (module docstring) -> PromptIds. `text` must hold `num_images` `<i>`;
    `image_slots` = the model's `cfg.image_token_slots` (default: the official model's)."""
    check_text(text, "prompt")
    if image_slots < 1:
        raise ValueError(f"image_slots must be >= 1, got {image_slots}.")
    mismatch = placeholder_mismatch(text, num_images)
    if mismatch:
        raise PromptError(mismatch)

    image_id, image_end_id = tokenizer.image_id, tokenizer.image_end_id
    ids, mask = [BOS_ID], [False]
    segments, _ = split_placeholders(text)  # a weight (`<i:0.8>`) changes no token: the pipeline applies it
    for segment in segments[:-1]:
        segment_ids = tokenizer.encode(segment)
        ids += segment_ids + [image_id] * (1 + image_slots) + [image_end_id]
        mask += [False] * len(segment_ids) + [False] + [True] * image_slots + [False]
    tail_ids = tokenizer.encode(segments[-1])
    ids += tail_ids
    mask += [False] * len(tail_ids)
    return PromptIds(ids, mask)


def build_unconditional_ids(tokenizer, negative_prompt: str = "") -> PromptIds:
    """The classifier-free-guidance input of the official `encode_condition`.

    The null input is `[<s>]`; the negative input is `[<s>] + ids(negative_prompt)`; the official
    code keeps whichever has more tokens (`max(null, negative, key=length)`, which returns the first
    on a tie). So an empty negative prompt, or one SentencePiece turns into no pieces (whitespace),
    gives `[<s>]`; any other negative prompt gives `[<s>] + its ids`. Text only: no image slots."""
    check_negative_prompt(negative_prompt)
    null = [BOS_ID]
    negative = [BOS_ID] + tokenizer.encode(negative_prompt)
    return PromptIds(max(null, negative, key=len))


def pad_batch(prompts: Sequence[PromptIds]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad prompts to the longest -> (ids [B, T] long, filled with PAD_ID; image_mask [B, T] bool).

    Right padding keeps every real token at its own position (the MLLM is causal, positions count
    from the left), so a prompt encodes the same alone or in a batch; the aligner masks the pads."""
    if not prompts:
        raise PromptError("pad_batch needs at least one prompt.")
    length = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), length), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt.ids)] = torch.tensor(prompt.ids, dtype=torch.long)
        mask[row, :len(prompt.image_mask)] = torch.tensor(prompt.image_mask, dtype=torch.bool)
    return ids, mask


def check_prompt_length(prompt_ids: PromptIds, max_tokens: int, what: str = "prompt") -> None:
    """Raise PromptError when the sequence has more than `max_tokens` tokens (T <= limit is fine)."""
    length = len(prompt_ids.ids)
    if length > max_tokens:
        images = prompt_ids.num_image_slots
        raise PromptError(
            f"The {what} is {length} tokens long (image slots included: {images}) but the model reads at most "
            f"{max_tokens} (its aligner's position table); shorten the text"
            f"{' or use fewer images' if images else ''}.")
