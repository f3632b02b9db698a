"""Sampling that keeps explanations inside a checkpoint's explanation language.

A verbalizer trained on a grammar (the sentence language of `explanations.py`) still writes a text outside it now
and then, mostly a genre that is not one of the language's ("A speech.", "An interrogative sentence."); such a text
states no checkable claim. With a grammar, each sampled token is checked against the text so far: a token after
which the text cannot become a parsing one within the tokens left (a fixed-length verbalizer writes exactly its
budget) is struck from that row's distribution and the row draws again with the same noise. With Gumbel-max
sampling that second draw is exactly a draw from the distribution restricted to the tokens not yet struck (the
order of the perturbed scores is a sample without replacement), so each step samples the model's own next-token
distribution restricted to the allowed tokens (a step-by-step restriction, not the distribution over whole texts
conditioned on parsing); at temperature 0 it takes the most likely allowed token. When `MAX_TRIES` draws find no
allowed token (the model is sure of a continuation the language forbids, e.g. more of a quoted token where only
the closing quote may come), the row's allowed set is computed over the whole vocabulary and the same noise draws
from it. A row with no allowed token at all (only possible from a forced start: a request's `add_tokens`) keeps
the model's own draw and is no longer constrained: its explanation is reported as it is and counted as not
parsing, never repaired behind the caller's back.

Rows whose text can no longer leave the language (the sentence language once its words have begun) are not
decoded again until the last step, so the check costs a decode of the few rows still writing their first parts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import explanations
from .sampling import sample_next

MAX_TRIES = 64  # draws per row and step before the allowed set is computed over the whole vocabulary


@dataclass(frozen=True)
class Grammar:
    """A language as questions about a text: can it still become one, with which short continuations does it
    become one, is it one, can it no longer leave it."""

    viable: Callable[[str], bool]
    completions: Callable[[str], list[str]]
    complete: Callable[[str], bool]
    settled: Callable[[str], bool]


# from this many tokens left on, any viable text can still finish (no shortest continuation is longer), so the
# continuations are only tokenized near the end
HORIZON = 12


def _sentence_settled(text: str) -> bool:
    # a parsing text with words: whatever follows is more words
    claims = explanations.parse(text)
    return claims is not None and claims.quote is not None


GRAMMARS: dict[str, Grammar] = {
    "sentence": Grammar(
        viable=explanations.viable,
        completions=explanations.completions,
        complete=lambda text: explanations.parse(text) is not None,
        settled=_sentence_settled,
    ),
}


def check_grammar(name: str | None) -> str | None:
    """The grammar name as given, refusing one that is not known (a checkpoint setting)."""
    if name is not None and name not in GRAMMARS:
        raise ValueError(f"unknown explanation grammar {name!r} (known: {', '.join(sorted(GRAMMARS))})")
    return name


class GuidedSampler:
    """Draws one token per row per step, keeping each row's text in the grammar (see the module docstring)."""

    def __init__(
        self,
        grammar: Grammar,
        tokenizer: Any,
        forced_ids: list[int],
        rows: int,
        vocabulary: Callable[[], list[str]],
        steps: int,
    ) -> None:
        self.grammar = grammar
        self.tokenizer = tokenizer
        self.vocabulary = vocabulary  # each token id's text alone, for the whole-vocabulary fallback
        self.ids = [list(forced_ids) for _ in range(rows)]
        # a forced start outside the language (a request's add_tokens) leaves nothing to keep: sample freely
        start = tokenizer.decode(forced_ids)
        start_ok = not forced_ids or (grammar.viable(start) and self._fits(start, steps))
        self.guided = [start_ok] * rows
        self.settled = [False] * rows
        self.given_up = 0

    def next(self, logits: Tensor, temperature: float, seeds: Tensor | None, *, steps_left: int) -> Tensor:
        """This step's token ids [R] from logits [R, V] and step seeds [R]; `steps_left`: tokens still to be drawn
        after this one (0: this token ends the explanation)."""
        final = steps_left == 0
        tok = sample_next(logits, temperature, seeds)
        first = tok.clone()  # the model's own draws, which a row given up keeps
        rows = [r for r in range(len(self.ids)) if self.guided[r] and (final or not self.settled[r])]
        struck: dict[int, list[int]] = {}
        for _ in range(MAX_TRIES):
            bad = [r for r in rows if not self._allows(r, int(tok[r]), steps_left)]
            if not bad:
                break
            for r in bad:
                struck.setdefault(r, []).append(int(tok[r]))
            idx = torch.tensor(bad, device=logits.device)
            sub = logits.index_select(0, idx).float()
            for i, r in enumerate(bad):
                sub[i, struck[r]] = float("-inf")
            tok[idx] = sample_next(sub, temperature, None if seeds is None else seeds[idx]).to(tok.dtype)
            rows = bad
        else:
            for r in rows:
                if self._allows(r, int(tok[r]), steps_left):
                    continue
                row_seeds = None if seeds is None else seeds[r : r + 1]
                found = self._draw_from_all(r, logits[r], temperature, row_seeds, steps_left)
                if found is None:
                    self.guided[r] = False
                    self.given_up += 1
                    tok[r] = first[r]
                else:
                    tok[r] = found
        for r, t in enumerate(tok.tolist()):
            self.ids[r].append(t)
        return tok

    def _draw_from_all(
        self, r: int, logits: Tensor, temperature: float, seeds: Tensor | None, steps_left: int
    ) -> int | None:
        """Row r's draw from every token the grammar allows after its text, or None when none is allowed.

        A token's own text appended to the row's text stands for decoding them together (equal for whole
        characters; a split multi-byte character is confirmed by a real decode before it is taken)."""
        text = self.tokenizer.decode(self.ids[r])

        # the cheap test over the whole vocabulary; whether a drawn token's text can still finish in time (and
        # the real decode) is checked as it is drawn
        accepts = self.grammar.complete if steps_left == 0 else self.grammar.viable

        pieces = self.vocabulary()
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        ok = [accepts(text + piece) for piece in pieces[: logits.shape[-1]]]
        allowed[: len(ok)] = torch.tensor(ok, dtype=torch.bool)  # ids past the tokenizer's (padding) never
        scores = logits.float().masked_fill(~allowed, float("-inf"))
        for tries in range(len(ok)):
            if not bool(torch.isfinite(scores).any()):
                return None
            if tries == MAX_TRIES:  # many draws that cannot finish in time: test every remaining one at once
                keep = [
                    i
                    for i in allowed.nonzero().flatten().tolist()
                    if self._fits(text + pieces[i], steps_left)
                ]
                allowed[:] = False
                allowed[keep] = True
                scores = scores.masked_fill(~allowed, float("-inf"))
                continue
            t = int(sample_next(scores.unsqueeze(0), temperature, seeds)[0])
            if self._allows(r, t, steps_left):
                return t
            scores[t] = float("-inf")
            allowed[t] = False
        return None

    def _fits(self, text: str, steps_left: int) -> bool:
        """Whether `text` can still become a parsing text in `steps_left` more tokens (a continuation's own tokens
        decode after the text's to the joined text)."""
        if steps_left >= HORIZON:
            return True
        encode = self.tokenizer.encode
        return any(
            len(encode(c, add_special_tokens=False)) <= steps_left for c in self.grammar.completions(text)
        )

    def _allows(self, r: int, token: int, steps_left: int) -> bool:
        text = self.tokenizer.decode(self.ids[r] + [token])
        if steps_left == 0:
            return self.grammar.complete(text)
        if not (self.grammar.viable(text) and self._fits(text, steps_left)):
            return False
        self.settled[r] = self.grammar.settled(text)
        return True
