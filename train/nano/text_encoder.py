"""Nano text encoder: a small transformers ``CLIPTextModel`` (768 wide, the SD1.5 context width) with
a word-level ``CLIPTokenizer``, trained contrastively (CLIP loss) against a tiny ``CLIPVisionModel``
on world (image, caption) pairs.

The U-Net's context is ``CLIPTextModel(...).last_hidden_state`` [B, 77, 768] of the caption padded to
77 tokens, exactly as SD1.5 uses CLIP-L. The empty caption "" encodes to
``<|startoftext|> <|endoftext|> x 76`` (SD1.5 also pads with the end token).

Tokenizer files are CLIP's format (``vocab.json`` + ``merges.txt``, byte-level BPE with ``</w>``
word ends): the 512 byte symbols (alone and as word ends), merges that build every world word into
one token (learnt as BPE learns merges), and the two specials. Words outside the world still tokenize (into characters).

Training cost: CLIP's text transformer is causal, so the hidden state of a token depends only on
the tokens before it. Training on captions cut to the batch's longest caption (instead of 77) gives
exactly the same hidden states and pooled outputs for the real tokens.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77  # SD1.5 context tokens
CONTEXT_DIM = 768  # SD1.5 context width
TEXT_SUBFOLDER = "text-encoder"
VISION_SUBFOLDER = "vision-tower"
PIXEL_MEAN = PIXEL_STD = 0.5  # the vision tower sees pixels01 * 2 - 1 (written to its preprocessor_config.json)


# ----------------------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """CLIP / GPT-2's reversible byte -> printable unicode map (the BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """(vocab {token: id}, merges ["a b", ...]) that make each of ``words`` a single token.

    The merges are learnt as BPE learns them (repeatedly merge the most frequent adjacent pair over
    all words, ties broken by first occurrence), so applying them in rank order - what the tokenizer
    does - reproduces the learning and ends with one token per word.
    """
    byte_map = bytes_to_unicode()
    base = list(byte_map.values())
    tokens = base + [c + "</w>" for c in base]
    known = set(tokens)
    merges: list[str] = []
    words = list(dict.fromkeys(words))
    split = []
    for word in words:
        chars = [byte_map[b] for b in word.encode("utf-8")]
        split.append(chars[:-1] + [chars[-1] + "</w>"])
    while any(len(parts) > 1 for parts in split):
        counts: dict[tuple[str, str], int] = {}
        for parts in split:
            for pair in zip(parts, parts[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = max(counts, key=counts.get)  # dicts keep first-seen order: ties go to the earliest pair
        merged = best[0] + best[1]
        merges.append(f"{best[0]} {best[1]}")
        if merged not in known:
            known.add(merged)
            tokens.append(merged)
        for i, parts in enumerate(split):
            out, j = [], 0
            while j < len(parts):
                if j + 1 < len(parts) and (parts[j], parts[j + 1]) == best:
                    out.append(merged)
                    j += 2
                else:
                    out.append(parts[j])
                    j += 1
            split[i] = out
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(words: list[str], folder: str | Path) -> Path:
    """Writes CLIP's ``vocab.json`` + ``merges.txt`` for ``words`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return folder


def load_tokenizer(folder: str | Path):
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if not (folder / "vocab.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise ValueError(f"no CLIP tokenizer in {folder} (vocab.json + merges.txt); run train.nano.train_text_encoder")
    return CLIPTokenizer.from_pretrained(str(folder))


def tokenize(tokenizer, captions: list[str], max_length: int = MAX_LENGTH) -> torch.Tensor:
    """captions -> input_ids [B, max_length] (BOS, words, EOS, EOS padding), like SD1.5."""
    out = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return out["input_ids"]


# ----------------------------------------------------------------------------- models


def text_config(tokenizer, layers: int, intermediate: int, heads: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CONTEXT_DIM, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=CONTEXT_DIM,
    )


def vision_config(width: int, layers: int, heads: int, image_size: int = 64, patch_size: int = 8):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
        image_size=image_size, patch_size=patch_size, hidden_act="quick_gelu", projection_dim=width,
    )


class ContrastivePair(nn.Module):
    """CLIP: text tower (CLIPTextModel) + vision tower (CLIPVisionModel) + projections + logit scale.

    embed_text(input_ids [B, T]) / embed_images(pixels [B, 3, H, W] in [0, 1]) -> [B, E] normalised;
    contrastive_loss(text [B, E], images [B, E]) -> symmetric InfoNCE loss (scalar).
    """

    def __init__(self, text_cfg, vision_cfg, embed_dim: int = 256):
        super().__init__()
        from transformers import CLIPTextModel, CLIPVisionModel

        self.text = CLIPTextModel(text_cfg)
        self.vision = CLIPVisionModel(vision_cfg)
        self.text_projection = nn.Linear(text_cfg.hidden_size, embed_dim, bias=False)
        self.visual_projection = nn.Linear(vision_cfg.hidden_size, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))  # log(1 / 0.07), CLIP's init

    def pool_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids=input_ids).pooler_output  # [B, 768] at the first EOS

    def pool_images(self, pixels01: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values=(pixels01 - PIXEL_MEAN) / PIXEL_STD).pooler_output  # [B, Dv]

    def embed_text(self, input_ids: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """[B, E] normalised; ``pooled`` = ``pool_text(input_ids)`` when the caller has it already."""
        pooled = self.pool_text(input_ids) if pooled is None else pooled
        return F.normalize(self.text_projection(pooled), dim=-1)

    def embed_images(self, pixels01: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """[B, E] normalised; ``pooled`` = ``pool_images(pixels01)`` when the caller has it already."""
        pooled = self.pool_images(pixels01) if pooled is None else pooled
        return F.normalize(self.visual_projection(pooled), dim=-1)

    def logits(self, input_ids: torch.Tensor, pixels01: torch.Tensor) -> torch.Tensor:
        """[B_text, B_image] scaled cosine similarities."""
        return self.similarity(self.embed_text(input_ids), self.embed_images(pixels01))

    def similarity(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised embeddings [B_text, E], [B_image, E] -> [B_text, B_image] scaled cosine similarities."""
        scale = self.logit_scale.clamp(max=4.6052).exp()  # CLIP caps the temperature at 100
        return scale * text_embeds @ image_embeds.T

    def contrastive_loss(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor,
                         same_caption: torch.Tensor | None = None) -> torch.Tensor:
        """Symmetric InfoNCE (CLIP) loss of normalised embeddings [B, E]. ``same_caption`` [B, B] bool
        marks pairs with identical captions: they count as positives (soft targets), so duplicate
        captions in a batch are not pushed apart."""
        logits = self.similarity(text_embeds, image_embeds)  # [B_text, B_image]
        b = logits.shape[0]
        targets = torch.eye(b) if same_caption is None else same_caption.float()
        targets = targets / targets.sum(1, keepdim=True)
        loss_t = torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
        loss_i = torch.sum(-targets.T * F.log_softmax(logits.T, dim=1), dim=1).mean()
        return (loss_t + loss_i) / 2


def trim_to_longest(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Cut [B, 77] ids after the longest caption's first EOS (exact for a causal text model)."""
    first_eos = (input_ids == eos_id).int().argmax(dim=1)
    return input_ids[:, : int(first_eos.max()) + 1]


# ----------------------------------------------------------------------------- save / load


def save_text_encoder(text_model, tokenizer, folder: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """transformers ``save_pretrained`` layout: CLIPTextModel (``dtype``) + tokenizer files.

    Besides ``tokenizer.json`` it keeps CLIP's ``vocab.json`` / ``merges.txt`` (what SD1.5 text encoder
    folders and older transformers read).
    """
    import copy

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(text_model).to(dtype)
    model.config.torch_dtype = dtype
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    vocab = tokenizer.get_vocab()
    source = getattr(tokenizer, "name_or_path", "")
    for name in ("vocab.json", "merges.txt"):
        src = Path(source) / name if source else None
        if src is not None and src.is_file() and not (folder / name).exists():
            (folder / name).write_bytes(src.read_bytes())
    if not (folder / "vocab.json").exists():
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    return folder


def load_text_encoder(folder: str | Path, dtype: torch.dtype = torch.float32):
    """(CLIPTextModel in eval mode, CLIPTokenizer) from a saved folder."""
    from transformers import CLIPTextModel

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"no CLIPTextModel in {folder} (config.json missing); run train.nano.train_text_encoder")
    model, loading = CLIPTextModel.from_pretrained(str(folder), dtype=dtype, output_loading_info=True)
    if loading["missing_keys"]:  # transformers only warns, and the model would be random where they are missing
        import transformers

        raise ValueError(f"{folder}: transformers {transformers.__version__} finds no weights for "
                         f"{len(loading['missing_keys'])} of the text encoder's tensors (e.g. "
                         f"{sorted(loading['missing_keys'])[0]}): the folder is incomplete, or was saved by another "
                         "transformers major version (the shipped one: transformers 5; see requirements-train.txt).")
    return model.eval(), load_tokenizer(folder)


def weights_fingerprint(text_model) -> str:
    """sha256 (16 hex digits) of the text model's weights rounded to fp16, the shipped precision: a U-Net
    records the text encoder it was trained on, so it is never exported or resumed with another one."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(text_model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float16).contiguous().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def encode_captions(text_model, tokenizer, captions: list[str], batch_size: int = 256) -> torch.Tensor:
    """captions -> last_hidden_state [N, 77, 768] (float32): the SD1.5 U-Net context."""
    text_model.eval()
    ids = tokenize(tokenizer, captions)
    out = [text_model(input_ids=ids[i:i + batch_size]).last_hidden_state.float() for i in range(0, len(ids), batch_size)]
    return torch.cat(out)


def save_vision_preprocessor(folder: Path, image_size: int = 64) -> None:
    """The vision tower's ``preprocessor_config.json`` (a CLIPImageProcessor): its pixel normalisation,
    which ``kosmosg_core.clip_vision`` folds in when the tower seeds the Kosmos-G nano vision encoder."""
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       image_mean=[PIXEL_MEAN] * 3, image_std=[PIXEL_STD] * 3).save_pretrained(str(folder))
