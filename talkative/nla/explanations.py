"""The explanation language of the second demo NLA: short plain-English sentences whose claims can be checked.

An explanation states up to three facts the activation carries, each checkable against the subject:

    A recipe. Reading "two cups of" — next likely "flour" or "sugar".
    └ genre ┘         └ quote: the last tokens ┘            └ the subject's top next tokens ┘

Grammar (docs/demo-model.md restates it):

    explanation := genre "."  [ " " reading ]  |  reading
    reading     := 'Reading "' quote '"' [ ' — next likely ' nexts ] "."  |  "Next likely " nexts "."
    nexts       := '"' next '"' [ ' or "' next '"' ]
    genre       := one of GENRE_LABELS' values ("A recipe", "Code", "A news report", ...)
    quote, next := text without double quotes, line breaks or runs of spaces (`clean_piece`)

The demo's warm start always writes all three parts; the shorter forms exist because the measurements that chose
this form compare them (scripts/explanation_contents.py).

Trailing spaces are padding (the verbalizer writes a fixed number of tokens) and are ignored. `parse` says
whether a text is in the language and extracts its claims; `check_claims` says which are true for a sample given
its genre, its recent context and the subject's top next tokens. Pure string functions, no model: the trainer
builds warm-start targets with `render`, GRPO fails texts `parse` refuses, and `talkative eval` counts true claims.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

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
RECENT_TOKENS = 16  # a quote is true when it occurs in the text of the last this-many tokens


@dataclass(frozen=True)
class Form:
    """Which parts a rendered explanation has: the genre, a quote of the last `quote` tokens, `next` top tokens."""

    genre: bool = True
    quote: int = 3
    next: int = 2


@dataclass(frozen=True)
class Claims:
    """What a parsed explanation states; a part it leaves out is None (or an empty tuple for `next`)."""

    genre: str | None  # a GENRE_LABELS key
    quote: str | None
    next: tuple[str, ...]


def clean_piece(text: str) -> str:
    """A piece of text as the language can quote it: whitespace runs (line breaks included) to one space,
    double quotes to single ones, trimmed."""
    return re.sub(r"\s+", " ", text.replace('"', "'")).strip()


def render(genre: str | None, quote: str | None, nexts: Sequence[str] = ()) -> str:
    """The sentence stating these claims; parts given as None or empty are left out."""
    parts = [GENRE_LABELS[genre] + "."] if genre is not None else []
    q = clean_piece(quote) if quote is not None else ""
    ns = [n for n in (clean_piece(x) for x in nexts) if n][:2]
    nxt = '"' + '" or "'.join(ns) + '"' if ns else ""
    if q:
        parts.append(f'Reading "{q}"' + (f" — next likely {nxt}." if nxt else "."))
    elif nxt:
        parts.append(f"Next likely {nxt}.")
    if not parts:
        raise ValueError("an explanation states at least one claim")
    return " ".join(parts)


_LABELS = "|".join(re.escape(label) for label in sorted(LABEL_GENRES, key=len, reverse=True))
_PATTERN = re.compile(
    rf"^(?:(?P<genre>{_LABELS})\.)? ?"
    r'(?:Reading "(?P<quote>[^"\n]+)")?'
    r'(?:(?: — next|Next) likely "(?P<n1>[^"\n]+)"(?: or "(?P<n2>[^"\n]+)")?)?\.?$'
)


def parse(text: str) -> Claims | None:
    """The claims of an explanation in the language, or None when it is not in it (padding spaces ignored).

    A text parses when it is exactly what `render` writes for the claims read from it, so every accepted text
    is in the canonical form of the grammar (no stray spaces, punctuation or missing parts)."""
    body = text.strip()
    m = _PATTERN.match(body)
    if m is None:
        return None
    genre = LABEL_GENRES[m.group("genre")] if m.group("genre") else None
    nexts = tuple(n for n in (m.group("n1"), m.group("n2")) if n)
    claims = Claims(genre, m.group("quote"), nexts)
    try:
        canonical = render(claims.genre, claims.quote, claims.next)
    except ValueError:
        return None
    return claims if canonical == body else None


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
