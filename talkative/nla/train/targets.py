"""Warm-start explanations computed from the data, as token ids of one fixed length.

Two languages:

* `context`: the t_text tokens of context just before the position (the first demo's warm start: the most
  faithful short text a frozen reconstructor can read, but fragments of other texts to a person).
* `sentence`: an explanation in the language of `nla/explanations.py`, e.g.
  `A recipe. Next likely "flour" or "sugar". Reading: add two cups of`, from the document's genre label, the
  subject's own top next tokens stored with the sample and the `quote` tokens before the current one. The
  verbalizer writes exactly t_text tokens, so a sentence is left-padded with spaces (which the parser ignores),
  which keeps the quoted words right before the current token; a sentence too long for t_text quotes fewer
  tokens, then names fewer next tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..explanations import READING, Form, clean_piece, render_prefix
from .data import ActivationSet

LANGUAGES = ("context", "sentence")


def context_ids(data: ActivationSet, idx: Tensor, t_text: int, space_id: int) -> Tensor:
    """The t_text context tokens before each sample's position (left-filled with spaces when short)."""
    return context_tail(data.ctx[idx], t_text, space_id)


def context_tail(ctx: Tensor, t_text: int, space_id: int) -> Tensor:
    """The t_text tokens before the last of each row of context ids (-1 = none: a space instead)."""
    if ctx.shape[1] < t_text + 1:
        raise ValueError(f"the dataset keeps {ctx.shape[1] - 1} context tokens; t_text {t_text} needs more")
    tail = ctx[:, -t_text - 1 : -1]
    return torch.where(tail < 0, torch.full_like(tail, space_id), tail)


def quote_ids(tokenizer: Any, ctx: list[int], n: int) -> list[int]:
    """The last `n` tokens before the current one (the last of `ctx`), as the context has them; reaches further
    back (up to 2n tokens) when those are only whitespace, and gives [] when there is nothing but."""
    ids = [t for t in ctx if t >= 0][:-1]
    for m in range(n, 2 * n + 1):
        if clean_piece(tokenizer.decode(ids[-m:])):
            return ids[-m:]
    return []


def sentence_tokens(tokenizer: Any, genre: str, ctx: list[int], top: list[int], form: Form) -> list[int]:
    """The explanation of one sample in `form`, unpadded: the genre and next-token parts tokenized, then
    "Reading:" and the context's own tokens (not re-tokenized, so they run into the current token exactly as in
    the text). [] when the form states nothing about the sample (only the measurements use such forms)."""
    quote = quote_ids(tokenizer, ctx, form.quote) if form.quote > 0 else []
    nexts = [tokenizer.decode([t]) for t in top[: form.next] if t >= 0]
    prefix = render_prefix(genre if form.genre else None, nexts)
    if quote:
        prefix = (prefix + " " if prefix else "") + READING
    if not prefix:
        return []
    return list(tokenizer(prefix, add_special_tokens=False)["input_ids"]) + quote


def sentence_text(tokenizer: Any, genre: str, ctx: list[int], top: list[int], form: Form) -> str:
    """The explanation of one sample in `form`, as text."""
    return str(tokenizer.decode(sentence_tokens(tokenizer, genre, ctx, top, form)))


def sentence_ids(
    tokenizer: Any, genre: str, ctx: list[int], top: list[int], form: Form, t_text: int, space_id: int
) -> list[int]:
    """`sentence_tokens` left-padded with spaces to t_text (so the words end right before the current token the
    reconstructor reads next), shortened until it fits: fewer quoted tokens, then fewer next tokens."""
    quote, nxt = form.quote, form.next
    while True:
        ids = sentence_tokens(tokenizer, genre, ctx, top, Form(form.genre, quote, nxt))
        if len(ids) <= t_text:
            return [space_id] * (t_text - len(ids)) + ids
        if quote > 1:
            quote -= 1
        elif nxt > 0:
            nxt -= 1
        else:
            raise ValueError(f"{tokenizer.decode(ids)!r} needs {len(ids)} tokens, more than t_text {t_text}")


def sentence_table(data: ActivationSet, tokenizer: Any, form: Form, t_text: int, space_id: int) -> Tensor:
    """[n, t_text] sentence ids of every sample (computed once per dataset: tokenizing per step would cost more
    than the step's forward on small batches)."""
    return sentence_rows(tokenizer, data.genres(), data.ctx, data.top, form, t_text, space_id)


def sentence_rows(
    tokenizer: Any, genres: list[str], ctx: Tensor, top: Tensor, form: Form, t_text: int, space_id: int
) -> Tensor:
    """[n, t_text] sentence ids for rows of genres, context ids [n, C] and top next-token ids [n, k]."""
    missing = sorted({i for i, g in enumerate(genres) if not g})
    if missing:
        raise ValueError(
            f"{len(missing)} samples have no genre (sample {missing[0]}): sentence explanations state one; "
            "use corpora that record it"
        )
    if bool((top[:, : form.next] < 0).any()):
        raise ValueError("the dataset stores no next-token predictions (extract with predictions: true)")
    rows = [
        sentence_ids(tokenizer, genres[i], ctx[i].tolist(), top[i].tolist(), form, t_text, space_id)
        for i in range(len(genres))
    ]
    return torch.tensor(rows, dtype=torch.long)


class WarmStart:
    """The warm-start ids of a dataset in one language, looked up by sample index."""

    def __init__(
        self, data: ActivationSet, language: str, tokenizer: Any, form: Form, t_text: int, space_id: int
    ) -> None:
        if language not in LANGUAGES:
            raise ValueError(f"explanation language must be one of {LANGUAGES}, got {language!r}")
        self.data, self.language, self.t_text, self.space_id = data, language, t_text, space_id
        self.table = (
            sentence_table(data, tokenizer, form, t_text, space_id) if language == "sentence" else None
        )

    def __call__(self, idx: Tensor) -> Tensor:
        if self.table is None:
            return context_ids(self.data, idx, self.t_text, self.space_id)
        return self.table[idx]
