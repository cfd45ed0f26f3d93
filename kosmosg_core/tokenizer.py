"""Text -> fairseq token ids, exactly as the official Kosmos-G task builds its vocabulary.

Two files define it (official names, decisions.md):
- `sentencepiece.bpe.model`: a SentencePiece BPE model that only splits text into pieces;
- `dict.txt`: fairseq's dictionary, one `piece count [#fairseq:overwrite]` per line.

fairseq ids (spec section 5): `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, then the dict.txt lines in
order, then the added symbols `<mask> </doc> <image> </image> </chunk> </line>`. For the official
files that is 4 + 63997 + 6 = 64007 ids, and fairseq id = SentencePiece id + 1 for normal pieces.
Text is encoded as `spm.encode(text, out_type=str)` and each piece *string* is looked up in the
dictionary (never SentencePiece's own ids); a piece the dictionary lacks becomes `<unk>`=3.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Iterable, Sequence

from .config import ADDED_SYMBOLS, BOS_ID, EOS_ID, FAIRSEQ_SPECIALS, PAD_ID, UNK_ID
from .errors import TokenizerError
from .files import check_input_path_length, path_length_problem

logger = logging.getLogger(__name__)

SPM_FILENAME = "sentencepiece.bpe.model"
DICT_FILENAME = "dict.txt"
TOKENIZER_FILENAMES = (SPM_FILENAME, DICT_FILENAME)
# Folders beside a checkpoint that may hold its tokenizer, in search order ("" = the checkpoint's own folder)
TOKENIZER_DIR_NAMES = ("{stem}", "{stem}-tokenizer", "tokenizer", "data", "")


def tokenizer_dir_candidates(checkpoint_path: Path) -> list[Path]:
    """The folders `TOKENIZER_DIR_NAMES` names, for the checkpoint at `checkpoint_path`; those whose names no file
    system can hold (<name>-tokenizer for a checkpoint name near the limit) left out: looking them up would raise."""
    candidates = [checkpoint_path.parent / name.format(stem=checkpoint_path.stem) for name in TOKENIZER_DIR_NAMES]
    return [candidate for candidate in candidates if not path_length_problem(candidate)]


def tokenizer_places_text(stem: str = "<checkpoint name>") -> str:
    """`TOKENIZER_DIR_NAMES` for messages: "<checkpoint name>/, ..., data/ or the checkpoint's own folder"."""
    names = [name.format(stem=stem) + "/" if name else "the checkpoint's own folder" for name in TOKENIZER_DIR_NAMES]
    return f"{', '.join(names[:-1])} or {names[-1]}"

_OVERWRITE_FLAG = "#fairseq:overwrite"
_FIX = (f"Use the official `{SPM_FILENAME}` and `{DICT_FILENAME}` that came with the Kosmos-G checkpoint "
        "(the official repository's `data/` folder), unchanged.")


class FairseqDictionary:
    """The subset of fairseq's `Dictionary` the model needs: symbols <-> ids, same add rules.

    `add_symbol` mirrors fairseq: a symbol already present is not added again (so an added symbol
    that dict.txt already holds keeps its dict.txt id), unless `overwrite` is set, in which case it
    takes a new id and the old id stays allocated (fairseq's `#fairseq:overwrite`)."""

    def __init__(self):
        self.symbols: list[str] = []
        self.indices: dict[str, int] = {}
        for symbol in FAIRSEQ_SPECIALS:
            self.add_symbol(symbol)

    def add_symbol(self, word: str, overwrite: bool = False) -> int:
        if word in self.indices and not overwrite:
            return self.indices[word]
        self.indices[word] = len(self.symbols)
        self.symbols.append(word)
        return self.indices[word]

    def index(self, word: str) -> int:
        return self.indices.get(word, UNK_ID)

    def __len__(self) -> int:
        return len(self.symbols)

    def __contains__(self, word: str) -> bool:
        return word in self.indices

    @classmethod
    def from_dict_txt(cls, data: bytes, source: str) -> tuple["FairseqDictionary", list[str]]:
        """Parse dict.txt bytes -> (dictionary with the added symbols, dict.txt pieces in file order).

        Same line rules as fairseq's `add_from_file`: strip trailing whitespace, split off the last
        field as the count (and an `#fairseq:overwrite` flag before it); a duplicate piece without the
        flag is an error. Blank lines, which fairseq rejects, are skipped (they carry no piece)."""
        try:
            # TextIOWrapper reads lines exactly like fairseq's open(..., "r", encoding="utf-8").
            lines = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8").readlines()
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{source} is not UTF-8 text ({e}); it is not a fairseq dict.txt. {_FIX}") from e
        dictionary = cls()
        pieces = []
        for line_no, raw in enumerate(lines, start=1):
            line = raw.rstrip()
            if not line:
                continue
            parts = line.rsplit(" ", 1)
            overwrite = False
            if len(parts) == 2 and parts[1] == _OVERWRITE_FLAG:
                overwrite = True
                parts = parts[0].rsplit(" ", 1)
            if len(parts) != 2 or not _is_int(parts[1]):
                shown = line if len(line) <= 80 else line[:77] + "..."
                raise TokenizerError(f"{source} line {line_no} is {shown!r}, expected '<piece> <count>' (optionally "
                                     f"followed by {_OVERWRITE_FLAG}); it is not a fairseq dict.txt. {_FIX}")
            word = parts[0]
            if word in dictionary and not overwrite:
                raise TokenizerError(f"{source} line {line_no}: piece {word!r} appears twice (fairseq refuses this "
                                     f"unless the line ends with {_OVERWRITE_FLAG}). {_FIX}")
            dictionary.add_symbol(word, overwrite=overwrite)
            pieces.append(word)
        if not pieces:
            raise TokenizerError(f"{source} holds no dictionary entries. {_FIX}")
        for symbol in ADDED_SYMBOLS:  # official GPTTask.setup_task: <mask>, then the SPECIAL_SYMBOLS
            dictionary.add_symbol(symbol)
        return dictionary, pieces


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _load_spm(data: bytes, source: str):
    import sentencepiece

    if not data:
        raise TokenizerError(f"{source} is empty; it should be a SentencePiece model. {_FIX}")
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(bytes(data))
    except (RuntimeError, OSError, TypeError, ValueError) as e:
        raise TokenizerError(f"{source} is not a valid SentencePiece model ({e}). {_FIX}") from e
    if processor.get_piece_size() <= 0:
        raise TokenizerError(f"{source} is a SentencePiece model without pieces. {_FIX}")
    return processor


class KosmosGTokenizer:
    """SentencePiece pieces looked up in the fairseq dictionary -> official Kosmos-G token ids."""

    def __init__(self, spm_bytes: bytes, dict_bytes: bytes, source: str | None = None, source_is_dir: bool = False):
        """`source` names where the files came from (a folder, a checkpoint) for error messages."""
        self.source = source or "the given tokenizer bytes"
        self._spm_bytes = bytes(spm_bytes)
        self._dict_bytes = bytes(dict_bytes)
        if source_is_dir:
            spm_source, dict_source = str(Path(source) / SPM_FILENAME), str(Path(source) / DICT_FILENAME)
        elif source:
            spm_source, dict_source = f"{SPM_FILENAME} in {source}", f"{DICT_FILENAME} in {source}"
        else:
            spm_source, dict_source = f"the {SPM_FILENAME} bytes", f"the {DICT_FILENAME} bytes"
        self._spm = _load_spm(self._spm_bytes, spm_source)
        self._dict, pieces = FairseqDictionary.from_dict_txt(self._dict_bytes, dict_source)
        self._check_pieces_match(pieces, spm_source, dict_source)

    # --- constructors ----------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, directory) -> "KosmosGTokenizer":
        """Read `sentencepiece.bpe.model` + `dict.txt` from a folder."""
        directory = Path(directory)
        check_input_path_length(directory, "Tokenizer folder", TokenizerError, kind="folder")  # is_dir() raises on it
        if not directory.is_dir():
            raise TokenizerError(f"Tokenizer folder {directory} does not exist (or is not a folder). Point it at the "
                                 f"folder holding {SPM_FILENAME} and {DICT_FILENAME}. {_FIX}")
        data = {}
        for name in TOKENIZER_FILENAMES:
            path = directory / name
            if not path.is_file():
                raise TokenizerError(f"Tokenizer folder {directory} has no {name}; it needs both {SPM_FILENAME} and "
                                     f"{DICT_FILENAME}. {_FIX}")
            try:
                data[name] = path.read_bytes()
            except OSError as e:
                raise TokenizerError(f"Cannot read {path}: {e}.") from e
        return cls(data[SPM_FILENAME], data[DICT_FILENAME], source=str(directory), source_is_dir=True)

    @classmethod
    def from_bytes(cls, spm_bytes: bytes, dict_bytes: bytes, source: str | None = None) -> "KosmosGTokenizer":
        """Build from the two files' contents (e.g. the copies stored inside a pack checkpoint;
        pass `source="<checkpoint path>"` so errors say where they came from)."""
        return cls(spm_bytes, dict_bytes, source=source)

    def to_bytes(self) -> tuple[bytes, bytes]:
        """(sentencepiece.bpe.model bytes, dict.txt bytes), byte-identical to what was read."""
        return self._spm_bytes, self._dict_bytes

    def save(self, directory) -> Path:
        """Write the two files (official names) into `directory`; returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / SPM_FILENAME).write_bytes(self._spm_bytes)
        (directory / DICT_FILENAME).write_bytes(self._dict_bytes)
        return directory

    # --- ids -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._dict)

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def image_id(self) -> int:
        """`<image>`: the begin-of-image token, also the id of the 64 feature slots."""
        return self._dict.index("<image>")

    @property
    def image_end_id(self) -> int:
        return self._dict.index("</image>")

    def token_to_id(self, piece: str) -> int:
        return self._dict.index(piece)

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < len(self._dict):
            raise TokenizerError(f"Token id {token_id} is outside this tokenizer's 0..{len(self._dict) - 1}.")
        return self._dict.symbols[token_id]

    def pieces(self, text: str) -> list[str]:
        """SentencePiece pieces of `text` (official `spm.encode(text, out_type=str)`)."""
        return self._spm.encode(text, out_type=str)

    def encode(self, text: str) -> list[int]:
        """Text -> fairseq ids. No `<s>` / `</s>` added (official `text_transform`, append_eos=False)."""
        if not isinstance(text, str):
            raise TokenizerError(f"Can only encode text, got {type(text).__name__}.")
        return [self._dict.index(piece) for piece in self.pieces(text)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Best-effort inverse of `encode` (for logs and tests): fairseq ids -> text.

        With `skip_special`, `<s> <pad> </s>` and the added symbols (`<image>`...) are dropped;
        `<unk>` is kept and shows as SentencePiece's unknown mark."""
        special = set(range(len(FAIRSEQ_SPECIALS))) - {UNK_ID}
        special.update(self._dict.index(s) for s in ADDED_SYMBOLS)
        pieces = []
        for token_id in ids:
            token_id = int(token_id)
            if skip_special and token_id in special:
                continue
            pieces.append(self._spm.id_to_piece(self._spm.unk_id()) if token_id == UNK_ID
                          else self.id_to_token(token_id))
        return self._spm.decode_pieces(pieces)

    # --- consistency -----------------------------------------------------------------------------
    def check_matches(self, vocab_size: int) -> None:
        """Raise unless this tokenizer has exactly `vocab_size` ids (the checkpoint's embedding rows)."""
        if int(vocab_size) != self.vocab_size:
            raise TokenizerError(
                f"The tokenizer in {self.source} has {self.vocab_size} ids but the checkpoint's embedding has "
                f"{vocab_size} rows; use the tokenizer that came with the checkpoint "
                f"({SPM_FILENAME} + {DICT_FILENAME}).")

    def _check_pieces_match(self, pieces: Sequence[str], spm_source: str, dict_source: str) -> None:
        """dict.txt must describe this SentencePiece model's pieces (official: pieces 3.. in spm order).

        A dict.txt piece SentencePiece never produces means the two files come from different
        tokenizers; the reverse (spm pieces missing from dict.txt) only turns them into `<unk>`."""
        spm_pieces = {self._spm.id_to_piece(i) for i in range(self._spm.get_piece_size())}
        foreign = [p for p in pieces if p not in spm_pieces]
        if foreign:
            shown = ", ".join(repr(p) for p in foreign[:5])
            raise TokenizerError(
                f"{dict_source} does not match {spm_source}: {len(foreign)} of its {len(pieces)} pieces are not "
                f"SentencePiece pieces (e.g. {shown}). The two files must come from the same tokenizer. {_FIX}")
        in_dict = set(pieces)
        missing = sum(1 for i in range(self._spm.get_piece_size())
                      if not (self._spm.is_control(i) or self._spm.is_unknown(i) or self._spm.is_unused(i))
                      and self._spm.id_to_piece(i) not in in_dict)
        if missing:
            logger.warning("%s lacks %d of the %d SentencePiece pieces in %s; text using them encodes as <unk>.",
                           dict_source, missing, len(spm_pieces), spm_source)

    def __repr__(self) -> str:
        return f"KosmosGTokenizer(source={self.source!r}, vocab_size={self.vocab_size})"
