"""The nano Kosmos-G tokenizer: SentencePiece BPE trained on the nano world's caption grammar.

`python -m train.nano.nano_tokenizer --out DIR` writes `DIR/sentencepiece.bpe.model` + `DIR/dict.txt`
in the official layout (pieces 0 `<unk>`, 1 `<s>`, 2 `</s>`, no pad piece; dict.txt lists pieces
3.. in SentencePiece order, one `piece 1` line each), so `kosmosg_core.tokenizer.KosmosGTokenizer`
reads it like the official one and adds the fairseq specials and the 6 added symbols
(`NANO_VOCAB_SIZE` ids in all, the `decoder.vocab_size` of train/configs/nano/kosmosg-nano.json).

The corpus is every caption the world's grammar can produce (one and two subjects, every colour,
shape, position and background) plus one line of printable ASCII, so any prompt still tokenizes
(unknown words fall back to characters). Training is deterministic: same bytes every run.
"""

from __future__ import annotations

import io
import itertools
import logging
import string
from pathlib import Path

from kosmosg_core.cli import OneValuePerFlagParser
from kosmosg_core.tokenizer import KosmosGTokenizer
from train.nano import world

logger = logging.getLogger(__name__)

SPM_PIECES = 180  # SentencePiece pieces, <unk> <s> </s> included
NANO_VOCAB_SIZE = SPM_PIECES + 7  # 4 fairseq specials + (pieces - 3) dict lines + 6 added symbols


def _phrase(colour: str, shape: str, position: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} {world.POSITION_PHRASES[position]}"


def world_captions() -> list[str]:
    """Every caption of the world grammar, in a fixed order (subjects left to right)."""
    kinds = list(itertools.product(world.COLOURS, world.SHAPES))
    lines = []
    for background in world.BACKGROUNDS_NAMES:
        for position in world.POSITIONS:
            lines += [f"{_phrase(c, s, position)}, on {background}" for c, s in kinds]
        for left, right in itertools.combinations(world.POSITIONS, 2):
            for (c1, s1), (c2, s2) in itertools.permutations(kinds, 2):
                lines.append(f"{_phrase(c1, s1, left)} and {_phrase(c2, s2, right)}, on {background}")
    return lines


def corpus() -> list[str]:
    ascii_line = " ".join(string.ascii_letters + string.digits + string.punctuation)
    return world_captions() + [ascii_line]


def tokenizer_bytes(pieces: int = SPM_PIECES) -> tuple[bytes, bytes]:
    """(sentencepiece.bpe.model bytes, dict.txt bytes)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, model_type="bpe", vocab_size=pieces,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # the official model's special pieces
        character_coverage=1.0, num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
        minloglevel=2)
    spm_bytes = model.getvalue()
    processor = sentencepiece.SentencePieceProcessor(model_proto=spm_bytes)
    dict_lines = "".join(f"{processor.id_to_piece(i)} 1\n" for i in range(3, processor.get_piece_size()))
    return spm_bytes, dict_lines.encode("utf-8")


def write_tokenizer(directory, pieces: int = SPM_PIECES) -> Path:
    """Write the two files into `directory` (created) and return it."""
    tokenizer = KosmosGTokenizer.from_bytes(*tokenizer_bytes(pieces))  # checked as every tokenizer the pack reads
    tokenizer.save(directory)
    logger.info("wrote the nano tokenizer (%d pieces, %d ids) to %s", pieces, tokenizer.vocab_size, directory)
    return Path(directory)


def main(argv: list[str] | None = None) -> int:
    parser = OneValuePerFlagParser(prog="python -m train.nano.nano_tokenizer", allow_abbrev=False,
                                   description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (sentencepiece.bpe.model + dict.txt)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    write_tokenizer(args.out)
    return 0


if __name__ == "__main__":
    from train.common.config import exit_on_input_error

    raise SystemExit(exit_on_input_error(main))
