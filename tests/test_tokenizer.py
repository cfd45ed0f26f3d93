"""KosmosGTokenizer: fairseq id layout, lookups by piece string, file handling and error messages."""

import logging

import pytest
import sentencepiece

from kosmosg_core.config import ADDED_SYMBOLS, BOS_ID, EOS_ID, PAD_ID, UNK_ID
from kosmosg_core.errors import TokenizerError
from kosmosg_core.tokenizer import DICT_FILENAME, SPM_FILENAME, KosmosGTokenizer
from support.tokenizer_fixture import (DEFAULT_VOCAB_SIZE, TINY_TOKENIZER_VOCAB_SIZE, build_tiny_tokenizer,
                                      tiny_tokenizer_bytes)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return KosmosGTokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def spm(tok_dir):
    return sentencepiece.SentencePieceProcessor(model_file=str(tok_dir / SPM_FILENAME))


def test_fixture_is_official_layout(spm, tok_dir):
    assert spm.get_piece_size() == DEFAULT_VOCAB_SIZE
    assert [spm.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert (spm.unk_id(), spm.bos_id(), spm.eos_id(), spm.pad_id()) == (0, 1, 2, -1)
    lines = (tok_dir / DICT_FILENAME).read_text(encoding="utf-8").splitlines()
    assert lines == [f"{spm.id_to_piece(i)} 1" for i in range(3, DEFAULT_VOCAB_SIZE)]


def test_fixture_is_deterministic():
    first = tiny_tokenizer_bytes()
    tiny_tokenizer_bytes.cache_clear()
    assert tiny_tokenizer_bytes() == first


def test_vocab_layout_and_special_ids(tok, spm):
    # 4 fairseq specials + (V - 3) dict lines + 6 added symbols
    assert tok.vocab_size == 4 + (DEFAULT_VOCAB_SIZE - 3) + len(ADDED_SYMBOLS) == TINY_TOKENIZER_VOCAB_SIZE
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (BOS_ID, PAD_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert [tok.id_to_token(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    first_added = DEFAULT_VOCAB_SIZE + 1
    assert [tok.token_to_id(s) for s in ADDED_SYMBOLS] == list(range(first_added, first_added + 6))
    assert tok.image_id == tok.token_to_id("<image>") == first_added + 2
    assert tok.image_end_id == tok.token_to_id("</image>") == first_added + 3
    # normal pieces: fairseq id = spm id + 1 (official dict.txt is spm pieces 3.. in order)
    for spm_id in (3, 50, DEFAULT_VOCAB_SIZE - 1):
        assert tok.token_to_id(spm.id_to_piece(spm_id)) == spm_id + 1


def test_encode_looks_up_piece_strings(tok, spm):
    text = "a small bird flying over the moon, photo, high quality."
    pieces = spm.encode(text, out_type=str)
    ids = tok.encode(text)
    assert len(ids) == len(pieces) > 3
    assert ids == [spm.piece_to_id(p) + 1 for p in pieces]
    assert BOS_ID not in ids and EOS_ID not in ids  # no <s> / </s> added
    assert tok.decode(ids) == text


def test_ids_follow_dict_order_not_spm_ids(tok_dir, spm):
    lines = (tok_dir / DICT_FILENAME).read_text(encoding="utf-8").splitlines()
    reordered = KosmosGTokenizer.from_bytes((tok_dir / SPM_FILENAME).read_bytes(),
                                            ("\n".join(reversed(lines)) + "\n").encode())
    text = "a cat running across the city street"
    pieces = spm.encode(text, out_type=str)
    position = {line.rsplit(" ", 1)[0]: row for row, line in enumerate(reversed(lines))}
    assert reordered.encode(text) == [4 + position[p] for p in pieces]


def test_unknown_pieces_map_to_unk(tok, spm):
    text = "zebra 你好"  # neither 'z' nor CJK appear in the fixture corpus
    pieces = spm.encode(text, out_type=str)
    ids = tok.encode(text)
    unknown = [i for i, p in enumerate(pieces) if spm.piece_to_id(p) == spm.unk_id()]
    assert unknown  # the test needs at least one unknown piece
    assert [ids[i] for i in unknown] == [UNK_ID] * len(unknown)
    assert all(ids[i] > 3 for i in range(len(ids)) if i not in unknown)


def test_empty_and_whitespace_text(tok):
    assert tok.encode("") == []
    assert tok.encode("   ") == []
    assert tok.encode("  a dog ") == tok.encode("a dog")  # spm's remove_extra_whitespaces


def test_decode_skips_specials(tok):
    ids = [BOS_ID] + tok.encode("a dog") + [tok.image_id, tok.image_end_id, EOS_ID, PAD_ID]
    assert tok.decode(ids) == "a dog"
    assert "image" in tok.decode(ids, skip_special=False)


def test_from_bytes_equals_from_dir(tok, tok_dir):
    spm_bytes = (tok_dir / SPM_FILENAME).read_bytes()
    dict_bytes = (tok_dir / DICT_FILENAME).read_bytes()
    other = KosmosGTokenizer.from_bytes(spm_bytes, dict_bytes)
    assert other.vocab_size == tok.vocab_size
    assert other.to_bytes() == tok.to_bytes() == (spm_bytes, dict_bytes)
    text = "the teapot standing near a wooden table, watercolor sketch"
    assert other.encode(text) == tok.encode(text)


def test_save_round_trip(tok, tmp_path):
    saved = tok.save(tmp_path / "copy")
    again = KosmosGTokenizer.from_dir(saved)
    assert again.to_bytes() == tok.to_bytes()
    assert again.encode("my friend wearing sunglasses") == tok.encode("my friend wearing sunglasses")


def test_check_matches(tok, tok_dir):
    tok.check_matches(tok.vocab_size)
    with pytest.raises(TokenizerError) as err:
        tok.check_matches(64007)
    message = str(err.value)
    assert str(tok_dir) in message and f"{tok.vocab_size} ids" in message and "64007 rows" in message
    assert "use the tokenizer that came with the checkpoint" in message


def test_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(TokenizerError, match="does not exist") as err:
        KosmosGTokenizer.from_dir(missing)
    assert str(missing) in str(err.value)


@pytest.mark.parametrize("absent", [SPM_FILENAME, DICT_FILENAME])
def test_missing_file(tok_dir, tmp_path, absent):
    target = tmp_path / "partial"
    target.mkdir()
    for name in (SPM_FILENAME, DICT_FILENAME):
        if name != absent:
            (target / name).write_bytes((tok_dir / name).read_bytes())
    with pytest.raises(TokenizerError) as err:
        KosmosGTokenizer.from_dir(target)
    assert str(target) in str(err.value) and f"has no {absent}" in str(err.value)


@pytest.mark.parametrize("garbage", [b"", b"this is not a protobuf at all\x00\xff" * 10])
def test_garbage_spm(tok_dir, garbage):
    with pytest.raises(TokenizerError, match="SentencePiece model") as err:
        KosmosGTokenizer.from_bytes(garbage, (tok_dir / DICT_FILENAME).read_bytes())
    assert "official" in str(err.value)  # the fix


def test_garbage_spm_in_dir_names_file(tok_dir, tmp_path):
    (tmp_path / SPM_FILENAME).write_bytes(b"\x08\x01garbage")
    (tmp_path / DICT_FILENAME).write_bytes((tok_dir / DICT_FILENAME).read_bytes())
    with pytest.raises(TokenizerError) as err:
        KosmosGTokenizer.from_dir(tmp_path)
    assert str(tmp_path / SPM_FILENAME) in str(err.value)


def test_from_bytes_source_named_in_errors(tok, tok_dir):
    spm_bytes, dict_bytes = tok.to_bytes()
    named = KosmosGTokenizer.from_bytes(spm_bytes, dict_bytes, source="/models/kosmosg.safetensors")
    with pytest.raises(TokenizerError, match="tokenizer in /models/kosmosg.safetensors has"):
        named.check_matches(tok.vocab_size + 1)
    with pytest.raises(TokenizerError, match="dict.txt in /models/kosmosg.safetensors does not match"):
        KosmosGTokenizer.from_bytes(spm_bytes, b"\xe2\x96\x81nonsense 1\n", source="/models/kosmosg.safetensors")


def test_dict_from_another_tokenizer(tok_dir):
    spm_bytes = (tok_dir / SPM_FILENAME).read_bytes()
    foreign = "".join(f"▁word{i} 1\n" for i in range(50)).encode()
    with pytest.raises(TokenizerError, match="does not match") as err:
        KosmosGTokenizer.from_bytes(spm_bytes, foreign)
    assert "50 of its 50 pieces" in str(err.value)


def test_dict_missing_pieces_warns(tok_dir, caplog):
    spm_bytes, dict_bytes = (tok_dir / SPM_FILENAME).read_bytes(), (tok_dir / DICT_FILENAME).read_bytes()
    truncated = b"".join(dict_bytes.splitlines(keepends=True)[:100])
    with caplog.at_level(logging.WARNING, logger="kosmosg_core.tokenizer"):
        small = KosmosGTokenizer.from_bytes(spm_bytes, truncated)
    assert small.vocab_size == 4 + 100 + 6
    assert any(f"lacks {DEFAULT_VOCAB_SIZE - 3 - 100} of" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("bad, fragment", [
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b"piece_without_count\n", "expected '<piece> <count>'"),
    (b"a 1\nb notanumber\n", "line 2"),
    (b"\n\n", "no dictionary entries"),
])
def test_corrupt_dict(tok_dir, bad, fragment):
    with pytest.raises(TokenizerError, match=fragment.replace("(", r"\(")):
        KosmosGTokenizer.from_bytes((tok_dir / SPM_FILENAME).read_bytes(), bad)


def test_dict_duplicates_and_overwrite_flag(tok, tok_dir, spm):
    spm_bytes = (tok_dir / SPM_FILENAME).read_bytes()
    lines = (tok_dir / DICT_FILENAME).read_text(encoding="utf-8").splitlines()
    piece = spm.id_to_piece(10)
    dup = "\n".join(lines + [f"{piece} 1"]) + "\n"
    with pytest.raises(TokenizerError, match="appears twice"):
        KosmosGTokenizer.from_bytes(spm_bytes, dup.encode())
    # fairseq's overwrite: the piece takes a new id at the end, the old slot stays allocated
    over = "\n".join(lines + [f"{piece} 5 #fairseq:overwrite"]) + "\n"
    tok2 = KosmosGTokenizer.from_bytes(spm_bytes, over.encode())
    assert tok2.vocab_size == tok.vocab_size + 1
    assert tok2.token_to_id(piece) == 4 + len(lines)
    assert tok2.image_id == tok.image_id + 1


def test_dict_tolerates_crlf_and_blank_lines(tok, tok_dir):
    dict_bytes = (tok_dir / DICT_FILENAME).read_bytes()
    crlf = dict_bytes.replace(b"\n", b"\r\n") + b"\r\n"
    other = KosmosGTokenizer.from_bytes((tok_dir / SPM_FILENAME).read_bytes(), crlf)
    assert other.vocab_size == tok.vocab_size
    assert other.encode("a red car") == tok.encode("a red car")
    # a blank line in the middle is skipped, the pieces after it kept (found by a mutation review: a `break` there
    # passed, as the blank lines tried were all at the end)
    lines = dict_bytes.split(b"\n")
    middle = b"\n".join(lines[:5] + [b"", b"   "] + lines[5:])
    gapped = KosmosGTokenizer.from_bytes((tok_dir / SPM_FILENAME).read_bytes(), middle)
    assert gapped.vocab_size == tok.vocab_size and gapped.encode("a red car") == tok.encode("a red car")


def test_encode_rejects_non_text(tok):
    with pytest.raises(TokenizerError, match="bytes"):
        tok.encode(b"a dog")
