"""A tiny tokenizer laid out exactly like the official one, for tests (no download).

`build_tiny_tokenizer(dir)` trains a small SentencePiece BPE model with the official special-piece
layout (0 `<unk>`, 1 `<s>`, 2 `</s>`, no pad piece) on a fixed synthetic English corpus, and
derives `dict.txt` the way the official one is derived: SentencePiece pieces 3.. in SentencePiece
order, one `piece 1` line each. The trained bytes are cached per process (one training per pytest
session and size); every call just writes the two files.

Id count of the resulting `KosmosGTokenizer`: 4 fairseq specials + (vocab_size - 3) dict lines +
6 added symbols = vocab_size + 7 (`DEFAULT_VOCAB_SIZE` -> `TINY_TOKENIZER_VOCAB_SIZE`).
Build the tiny model with `KosmosGConfig.tiny(vocab_size=tokenizer.vocab_size)`.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

DEFAULT_VOCAB_SIZE = 200  # SentencePiece pieces, <unk> <s> </s> included
TINY_TOKENIZER_VOCAB_SIZE = DEFAULT_VOCAB_SIZE + 7  # fairseq ids of the default tiny tokenizer

_SUBJECTS = ["a dog", "a cat", "the robot", "an old man", "a red car", "the teapot", "a small bird", "my friend"]
_ACTIONS = ["sitting on", "running across", "painted on", "standing near", "flying over", "wearing"]
_PLACES = ["the beach", "a wooden table", "the moon", "a snowy mountain", "the city street", "sunglasses"]
_STYLES = ["as an oil painting", "in the style of van gogh", "photo, high quality", "watercolor sketch",
           "in a comic book", "at night with neon lights"]


def _corpus() -> list[str]:
    """Deterministic sentences: every combination, plus digits and punctuation for coverage."""
    lines = []
    for i, subject in enumerate(_SUBJECTS):
        for j, action in enumerate(_ACTIONS):
            for k, place in enumerate(_PLACES):
                style = _STYLES[(i + j + k) % len(_STYLES)]
                lines.append(f"{subject} {action} {place}, {style}.")
    lines.append("0 1 2 3 4 5 6 7 8 9 ! ? ' \" ( ) - : ; / & A B C D E F G H I J K L M N O P Q R S T U V W X Y Z")
    return lines


@functools.lru_cache(maxsize=None)
def tiny_tokenizer_bytes(vocab_size: int = DEFAULT_VOCAB_SIZE) -> tuple[bytes, bytes]:
    """(sentencepiece.bpe.model bytes, dict.txt bytes) of the tiny tokenizer; trained once per size."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # the official model's special pieces
        character_coverage=1.0,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    spm_bytes = model.getvalue()
    processor = sentencepiece.SentencePieceProcessor(model_proto=spm_bytes)
    pieces = [processor.id_to_piece(i) for i in range(3, processor.get_piece_size())]
    dict_bytes = "".join(f"{piece} 1\n" for piece in pieces).encode("utf-8")
    return spm_bytes, dict_bytes


def build_tiny_tokenizer(directory, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Write `sentencepiece.bpe.model` + `dict.txt` into `directory` (created) and return it.

    `vocab_size` counts SentencePiece pieces; the tokenizer read back has `vocab_size + 7` ids."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spm_bytes, dict_bytes = tiny_tokenizer_bytes(vocab_size)
    (directory / "sentencepiece.bpe.model").write_bytes(spm_bytes)
    (directory / "dict.txt").write_bytes(dict_bytes)
    return directory
