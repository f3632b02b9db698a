"""The explanation language of the second demo NLA: short plain-English sentences whose claims can be checked.

An explanation states up to three facts the activation carries, each checkable against the subject:

    A recipe. Next likely "flour" or "sugar". Reading: add two cups of
    └genre─┘  └─ the subject's top next tokens ─┘ └ the words just before the token ┘

Grammar (docs/demo-model.md restates it):

    explanation := [ genre "." ] [ " " ] [ next ] [ " " ] [ "Reading:" words ]      (at least one part)
    next        := 'Next likely "' token '"' [ ' or "' token '"' ] "."
    genre       := one of GENRE_LABELS' values ("A recipe", "Code", "A news report", ...)
    token       := text without double quotes or line breaks, trimmed
    words       := the rest of the explanation: the text just before the token being explained, as it is

Parts are separated by one space and come in this order; `parse` accepts exactly what `render` writes. The words
come last and unquoted on purpose: the reconstructor reads the explanation followed by the current token, and
raw context that runs straight into that token carries twice the activation a quoted copy does (measured with a
frozen reconstructor, docs/demo-model.md). Leading and trailing spaces are padding (the verbalizer writes a fixed
number of tokens) and are ignored. `check_claims` says which claims are true for a sample given its genre, its
recent context and the subject's top next tokens. Pure string functions, no model: the trainer builds warm-start
targets with `render`'s parts, GRPO fails texts `parse` refuses, and `talkative eval` counts true claims.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import regex

# genre key -> how an explanation names it. Modern genres (nla/train/modern.py) and the kinds of the historical
# corpora, so every training document has a genre an explanation can state.
GENRE_LABELS: dict[str, str] = {
    "conversation": "A chat",
    "news": "A news report",
    "story": "A story",
    "email": "An email",
    "recipe": "A recipe",
    "instructions": "Instructions",
    "product": "A product description",
    "code": "Code",
    "qa": "A question and answer",
    "encyclopedia": "An encyclopedia entry",
    "dialogue": "A dialogue",
    "review": "A review",
    "play": "A play",
    "poem": "A poem",
    "scripture": "Scripture",
    "documentation": "Documentation",
    "dictionary": "A dictionary",
    "quotation": "A quotation",
}
LABEL_GENRES = {label: key for key, label in GENRE_LABELS.items()}

# the genre of every document of a corpus that records none itself
CORPUS_GENRES: dict[str, str] = {
    "shakespeare": "play",
    "milton": "poem",
    "kjv": "scripture",
    "python-docs": "documentation",
    "gcide": "dictionary",
    "fortunes": "quotation",
    "chats": "conversation",
}

MAX_TOKENS = 24  # an explanation's length budget: analysis time grows with it
RECENT_TOKENS = 16  # the quoted words are true when they occur in the text of the last this-many tokens
READING = "Reading:"


@dataclass(frozen=True)
class Form:
    """Which parts a rendered explanation has: the genre, `next` top next tokens, the last `quote` tokens."""

    genre: bool = True
    quote: int = 6
    next: int = 2


@dataclass(frozen=True)
class Claims:
    """What a parsed explanation states; a part it leaves out is None (or an empty tuple for `next`)."""

    genre: str | None  # a GENRE_LABELS key
    quote: str | None  # the words after "Reading:", cleaned (`clean_piece`)
    next: tuple[str, ...]


def clean_piece(text: str) -> str:
    """A piece of text as the language compares it: whitespace runs (line breaks included) to one space, double
    quotes to single ones, trimmed."""
    return re.sub(r"\s+", " ", text.replace('"', "'")).strip()


def render_prefix(genre: str | None, nexts: Sequence[str] = ()) -> str:
    """The genre and next-token parts ("" when neither is given)."""
    parts = [GENRE_LABELS[genre] + "."] if genre is not None else []
    ns = [n for n in (clean_piece(x) for x in nexts) if n][:2]
    if ns:
        parts.append('Next likely "' + '" or "'.join(ns) + '".')
    return " ".join(parts)


def render(genre: str | None, quote: str | None, nexts: Sequence[str] = ()) -> str:
    """The explanation stating these claims; `quote` is the raw text just before the token (kept as it is)."""
    prefix = render_prefix(genre, nexts)
    if quote is not None and clean_piece(quote):
        return (prefix + " " if prefix else "") + READING + quote
    if not prefix:
        raise ValueError("an explanation states at least one claim")
    return prefix


_LABELS = "|".join(re.escape(label) for label in sorted(LABEL_GENRES, key=len, reverse=True))
_GENRE = re.compile(rf"({_LABELS})\.")
_NEXT = re.compile(r'Next likely "([^"\n]+)"(?: or "([^"\n]+)")?\.')


def parse(text: str) -> Claims | None:
    """The claims of an explanation in the language, or None when it is not in it (padding spaces ignored).

    A text parses when it is exactly what `render` writes for the claims read from it, so every accepted text
    is in the canonical form of the grammar (no stray spaces, punctuation or missing parts)."""
    body = text.strip()
    rest = body
    genre: str | None = None
    nexts: tuple[str, ...] = ()
    quote: str | None = None
    if m := _GENRE.match(rest):
        genre, rest = LABEL_GENRES[m.group(1)], rest[m.end() :].removeprefix(" ")
    if m := _NEXT.match(rest):
        nexts, rest = tuple(n for n in m.groups() if n), rest[m.end() :].removeprefix(" ")
    if rest.startswith(READING):
        quote, rest = rest[len(READING) :], ""
    if rest or (genre is None and not nexts and quote is None):
        return None
    try:
        canonical = render(genre, quote, nexts)
    except ValueError:
        return None
    if canonical != body:
        return None
    return Claims(genre, clean_piece(quote) if quote is not None else None, nexts)


# The whole language as one pattern, for constrained sampling: `regex` answers whether a text is a prefix of some
# explanation (partial matching), which `re` cannot. A token is a cleaned piece: no quotes, no line breaks, single
# spaces inside, none at its ends.
_PIECE = r'[^"\s]+(?: [^"\s]+)*'
_PART_GENRE = rf"(?:{_LABELS})\."
_PART_NEXT = rf'Next likely "{_PIECE}"(?: or "{_PIECE}")?\.'
_PART_WORDS = re.escape(READING) + r".*"
_LANGUAGE = regex.compile(
    rf"(?:{_PART_GENRE}(?: {_PART_NEXT})?(?: {_PART_WORDS})?|{_PART_NEXT}(?: {_PART_WORDS})?|{_PART_WORDS})",
    regex.DOTALL,
)


def viable(text: str) -> bool:
    """Whether some continuation of `text` parses: leading padding spaces are free, and then the text must follow
    the grammar so far. Once the words have begun anything may follow (they are the context as it is)."""
    body = text.lstrip()
    return not body or _LANGUAGE.fullmatch(body, partial=True) is not None


_NEXT_OPEN, _OR_OPEN = 'Next likely "', ' or "'


def completions(text: str) -> list[str]:
    """Short continuations after which `text` parses ([""] when it parses already, [] when nothing can follow):
    the rest of a started genre label or keyword, a stated token's closing quote and full stop, one word after
    "Reading:". A sampler with a fixed token budget keeps a row only while one of these still fits."""
    if not viable(text):
        return []
    if parse(text) is not None:
        return [""]
    body = text.lstrip()
    tails = {"Code.", '".', 'x".', ".", "x"}

    def rest_of(word: str, then: str) -> None:
        for i in range(1, len(word)):
            if body.endswith(word[:i]):
                tails.add(word[i:] + then)
        if body.endswith(word):
            tails.add(then)

    for label in LABEL_GENRES:
        rest_of(label, ".")
    rest_of(_NEXT_OPEN, 'x".')
    rest_of(_OR_OPEN, 'x".')
    rest_of(READING, "x")
    return sorted((t for t in tails if parse(text + t) is not None), key=len)


@dataclass(frozen=True)
class Verdict:
    """Which claims of one explanation are true (None: the explanation makes no such claim)."""

    parses: bool
    genre: bool | None = None
    quote: bool | None = None
    next: bool | None = None


def check_claims(text: str, genre: str, recent_text: str, top_next: Sequence[str]) -> Verdict:
    """Check an explanation against a sample: its document's genre key, the decoded text of its last
    RECENT_TOKENS tokens (current token included), and the decoded top next tokens of the subject (top 5).

    The quote is true when it occurs in the recent text (both cleaned alike); the next-token claim is true when
    its first stated token is one of the top next tokens (compared cleaned: a leading space is no difference a
    reader can see).
    """
    claims = parse(text)
    if claims is None:
        return Verdict(False)
    stated_genre = None if claims.genre is None else claims.genre == genre
    quote = None
    if claims.quote is not None:
        quote = clean_piece(claims.quote) in clean_piece(recent_text)
    nxt = None
    if claims.next:
        nxt = clean_piece(claims.next[0]) in {clean_piece(t) for t in top_next}
    return Verdict(True, stated_genre, quote, nxt)


def claim_score(text: str, genre: str, recent_text: str, top_next: Sequence[str]) -> float:
    """How much of what an explanation states is true, in [0, 1]: the mean over the three kinds of claim (a kind it
    does not state scores 0), the quote graded by the share of its words, counted from its end, that occur
    together in the recent text (the words nearest the token are the ones the activation carries best, and an
    all-or-nothing quote gives a sampler nothing to climb). A text that does not parse scores 0. GRPO adds it to
    the reward so the claims an explanation states become true ones, which `check_claims` then counts."""
    claims = parse(text)
    if claims is None:
        return 0.0
    verdict = check_claims(text, genre, recent_text, top_next)
    quote = 0.0
    if claims.quote is not None:
        words = claims.quote.split(" ")
        recent = clean_piece(recent_text)
        true_tail = 0
        while true_tail < len(words) and " ".join(words[-true_tail - 1 :]) in recent:
            true_tail += 1
        quote = true_tail / len(words)
    return (float(bool(verdict.genre)) + float(bool(verdict.next)) + quote) / 3
