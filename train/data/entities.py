"""Entity words: the extraction prompt, parsing an LLM answer, the official filters, and the
interleaved caption layout (entity word followed by its image).

Facts (spec section 8, official OpenImages loader and converter):
- the converter asks an instruction LLM for comma-separated foreground nouns and keeps a tag only
  when it occurs in the caption;
- the loader drops colour words (its lower-case list, compared exactly), tags absent from the caption
  as whole words (any case), and tags that occur as whole words inside more than one tag ("dog" next to
  "dog collar" is ambiguous; this test is case-sensitive and reads the tag as a regular expression);
- tags are ordered by where their first match ends in the caption and consumed left to right;
  each entity segment runs to the end of the word (next delimiter) and gets one trailing space;
- with `random_drop_caption_prob` the entity word itself is removed (text up to its start only).

Everything here is pure string work, so garbage model output can only ever shrink the entity list.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass, field

from kosmosg_core.config import IMAGE_PLACEHOLDER, PLACEHOLDER_PATTERN

logger = logging.getLogger(__name__)

# Colour words the official loader refuses as entities (they name no object to crop).
COLOUR_WORDS = frozenset({
    "yellow", "blue", "red", "green", "white", "black", "brown", "grey", "gray", "purple",
    "pink", "orange", "cyan", "silver", "gold", "golden",
})

# Words that never name an object on their own; a "tag" made only of them is dropped (garbage
# answers of small models; the official pipeline relies on MPT-7B-Instruct not producing them).
FUNCTION_WORDS = frozenset({
    "a", "an", "the", "this", "that", "these", "those", "some", "any", "each", "one", "two", "of", "on", "in",
    "at", "to", "by", "for", "from", "with", "and", "or", "is", "are", "it", "its", "his", "her", "their",
    "there", "here", "up", "down", "over", "under", "near", "next", "front", "behind",
})

# Characters that end an entity word in the caption (official loader's delimiter set).
WORD_DELIMITERS = frozenset(" ,.!?;:)]}")

# Dolly / MPT-7B-Instruct prompt format, which the official converter uses with MPT-7B-Instruct.
# The instruction is the paper's idea in our words: comma-separated foreground nouns only.
DEFAULT_ENTITY_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n"
    "### Instruction:\n"
    "List the objects named in the caption, separated by commas. Leave out background elements "
    "(places, locations, surroundings) and keep only foreground objects. Write nouns only, without "
    "adjectives.\n\n"
    "### Input:\n{caption}\n\n"
    "### Response:\n"
)

_LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022]+|\d+[.)])\s*")  # "- dog", "* dog", "1. dog", "2) dog"
_SPLIT = re.compile(r"[,\n;|]+")
_STRIP_CHARS = " \t\"'`.!?:()[]{}"


def clean_text(text: str) -> str:
    """One line, single spaces: TSV-safe (no tab / newline) and stable for matching. Every control character
    (tab, newline, NUL...) becomes a space, and a literal `<i>` (HTML italics in scraped captions; or `<i:...>`)
    is removed: in a sample's text it would be read as an image placeholder and the sample could not be trained on."""
    while True:  # again until none is left: removing `<i>` from `<i:<i>>` leaves `<i: >`
        text, removed = PLACEHOLDER_PATTERN.subn(" ", text)
        if not removed:
            break
    return " ".join("".join(" " if unicodedata.category(c) == "Cc" else c for c in text).split())


def parse_entity_answer(answer: str, max_words: int = 4) -> list[str]:
    """Turn an LLM answer into candidate tags (not yet checked against the caption).

    Robust to what instruction models add: a following "### ..." section (cut there, where the
    official converter drops the whole sample), bullets, numbering, "and", quotes, trailing dots.
    Tags longer than `max_words` words are sentences, not nouns, and are dropped. Order is kept, a tag
    repeated as written is kept once (the official converter would store it twice, and its loader then
    drops both as ambiguous); case variants stay, for the converter's case-sensitive test to pick from.
    """
    answer = answer.split("#", 1)[0]
    tags: list[str] = []
    seen: set[str] = set()
    for piece in _SPLIT.split(answer):
        piece = _LIST_MARKER.sub("", piece)
        piece = re.sub(r"^(?:and|or)\s+", "", piece.strip(), flags=re.IGNORECASE)
        piece = " ".join(piece.strip(_STRIP_CHARS).split())
        if not piece or len(piece.split()) > max_words:
            continue
        if all(word.lower() in FUNCTION_WORDS for word in piece.split()):
            continue
        if piece not in seen:
            seen.add(piece)
            tags.append(piece)
    return tags


def _whole_word(tag: str) -> re.Pattern:
    return re.compile(r"\b{}\b".format(re.escape(tag)), re.IGNORECASE)


def converter_tags(tags: list[str], caption: str) -> list[str]:
    """The official converter's tag filter (scripts/convert_openimage.py): non-empty tags found in the caption as
    written (a case-sensitive substring). Those with a mask are the stored tags the loader reads."""
    return [tag for tag in tags if tag and tag in caption]


def filter_entities(tags: list[str], caption: str) -> list[str]:
    """The official loader's tag filter (`tag_filter`) over the stored tags, with its own tests, in its order:
    colour words dropped (its lower-case list, exactly: "Red" stays); tags not found in the caption as a whole word
    (any case) dropped; tags found as a whole word in more than one stored tag dropped (ambiguous: "dog" beside
    "dog collar", also when "dog collar" is itself dropped; a tag stored twice is ambiguous too). That last test is
    case-sensitive ("Dog" beside "dog collar" stays) and reads the tag unescaped, as a regular expression; a tag
    that is not a valid one made the official loader skip the whole line, so no tag is kept then."""
    kept = []
    for tag in tags:
        if not tag or tag in COLOUR_WORDS or _whole_word(tag).search(caption) is None:
            continue
        try:
            as_written = re.compile(r"\b{}\b".format(tag))
        except re.error as error:
            logger.warning("entity tag %r is not a valid regular expression (%s): the official loader skips "
                           "the whole sample then, and so does this", tag, error)
            return []
        if sum(as_written.search(other) is not None for other in tags) > 1:
            continue
        kept.append(tag)
    return kept


def _mention_ends(tag: str, caption: str) -> list[int]:
    """Where each mention of `tag` the layout can place ends: the first whole-word match, then the next one after
    the end of that match's word (placing a mention consumes its word: "dog-dog" is one mention)."""
    ends, start, pattern = [], 0, _whole_word(tag)
    while (match := pattern.search(caption, start)) is not None:
        ends.append(match.end())
        start = match.end()
        while start < len(caption) and caption[start] not in WORD_DELIMITERS:
            start += 1
    return ends


def order_entities(tags: list[str], caption: str) -> list[str]:
    """Sort tags by where their first whole-word match ends in the caption (stable), as the official loader
    does. A tag given k times (entities of one name in a labelled scene; the official filters never pass a
    repeated tag) is sorted by its first, second... k-th match; one past the caption's matches goes last (it
    is not placed)."""
    def match_end(numbered: tuple[int, str]) -> float:
        index, tag = numbered
        occurrence = tags[:index].count(tag)  # as spelled: the official loader sorts case variants alike
        ends = _mention_ends(tag, caption)
        return ends[occurrence] if occurrence < len(ends) else float("inf")

    return [tag for _, tag in sorted(enumerate(tags), key=match_end)]


@dataclass
class Layout:
    """Interleaved text of one sample.

    `text` has `<i>` where each entity image goes (keep mode); `text_dropped` is the variant with the
    entity words removed (drop mode); `drop_spans` are the [start, end) character spans of `text`
    whose removal gives `text_dropped`. `entities` are the tags actually placed, in order.
    """

    text: str
    text_dropped: str
    drop_spans: list[list[int]] = field(default_factory=list)
    entities: list[str] = field(default_factory=list)


def layout_interleaved(caption: str, tags: list[str]) -> Layout:
    """Place each tag's image right after its word, consuming the caption left to right as the
    official loader does. Tags are filtered and ordered first; a tag whose word is not found in the
    rest of the caption (overlap with an earlier tag) is skipped.

    Keep mode segment: caption up to the end of the word, plus one space if it does not end in one.
    Drop mode segment: caption up to the start of the word, plus one space under the same rule
    (empty when the word starts the caption, where the official loader skips the sample instead).
    """
    return place_entities(caption, order_entities(filter_entities(tags, caption), caption))


def place_entities(caption: str, tags: list[str]) -> Layout:
    """The placement of `layout_interleaved` for tags already filtered and ordered (a tag may repeat)."""
    text, dropped, spans, placed = "", "", [], []
    rest = caption
    for tag in tags:
        match = _whole_word(tag).search(rest)
        if match is None:
            continue
        head, tail = match.start(), match.end()
        while tail < len(rest) and rest[tail] not in WORD_DELIMITERS:
            tail += 1
        before, word = rest[:head], rest[head:tail]
        keep_segment = before + word + " "  # word never ends with a space, so one is always added
        needs_space = bool(before) and not before.endswith(" ")
        drop_segment = before + (" " if needs_space else "")
        # what removing the word from the keep segment must delete so both variants agree
        span_start = len(text) + len(before)
        span_end = span_start + len(word) + (0 if needs_space else 1)
        spans.append([span_start, span_end])
        text += keep_segment + IMAGE_PLACEHOLDER
        dropped += drop_segment + IMAGE_PLACEHOLDER
        placed.append(tag)
        rest = rest[tail:]
    text += rest
    dropped += rest
    return Layout(text=text, text_dropped=dropped, drop_spans=spans, entities=placed)
