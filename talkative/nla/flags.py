"""Row flags: what a reader should know about one row before trusting it.

Two families. *Position* flags (`nla.analysis.position_flags`: early positions, BOS, system prompt, norm outliers)
describe the input: those positions are not what the NLA was trained to explain. *Row* flags, defined here,
describe the outcome at one position:

* `low_confidence`: the reconstruction is no better than the baseline. With an FVE baseline (the checkpoint's
  activation variance), FVE ≤ `LOW_CONFIDENCE_FVE` (0: no better than predicting the mean); without one,
  relative RMSE ≥ `LOW_CONFIDENCE_RELATIVE_RMSE` (1: no closer to the activation than the zero vector). Rows
  without metrics (`no_eval`) carry no verdict.
* `degenerate`: the explanation is not readable text. Either a repeated word n-gram (n ≤ `DEGENERATE_MAX_NGRAM`,
  at least `DEGENERATE_MIN_REPEATS` non-overlapping occurrences) covers at least `DEGENERATE_REPEAT_SHARE` of its
  words (explanations of at least `DEGENERATE_MIN_WORDS` words), or fewer than `SCRIPT_MIN_SHARE` of its letters
  are in the explanations' usual scripts (`USUAL_SCRIPTS`; explanations of at least `SCRIPT_MIN_LETTERS` letters).
* `truncated`: a free-length verbalizer's explanation hit its token budget (`finish_reason` "length"); a
  fixed-length verbalizer always writes its length, so its rows never carry it.

The summary means leave out rows with a position flag, `degenerate` or `truncated` (their scores measure a text
that is not an explanation), and keep `low_confidence` rows: that flag is a verdict on the score itself, and
leaving those rows out would make the mean describe only the rows that scored well. Each count is reported.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

#: flags of the input's positions (`nla.analysis.position_flags`), in the order rows list them
POSITION_FLAGS = ("early_position", "bos", "system_prompt", "outlier")
#: flags of one row's outcome, listed after the position flags
ROW_FLAGS = ("low_confidence", "degenerate", "truncated")
FLAGS = POSITION_FLAGS + ROW_FLAGS
#: flags whose rows the summary means leave out (every flag but `low_confidence`: see the module docstring)
EXCLUDING_FLAGS = (*POSITION_FLAGS, "degenerate", "truncated")

LOW_CONFIDENCE_FVE = 0.0  # FVE at or below: no better than the mean activation
LOW_CONFIDENCE_RELATIVE_RMSE = 1.0  # without an FVE baseline, relative RMSE at or above: no better than zero

DEGENERATE_MIN_WORDS = 6  # shorter explanations are not judged for repetition
DEGENERATE_MAX_NGRAM = 3
DEGENERATE_MIN_REPEATS = 3
DEGENERATE_REPEAT_SHARE = 0.5  # share of the words one repeated n-gram covers, at or above: degenerate

USUAL_SCRIPTS = ("LATIN",)  # the explanations of the NLAs served here are English
SCRIPT_MIN_LETTERS = 4  # fewer letters are not judged for script
SCRIPT_MIN_SHARE = 0.5  # share of letters in a usual script, below: degenerate


def low_confidence(fve: float | None, relative_rmse: float | None) -> bool | None:
    """Whether a row's reconstruction is no better than the baseline; None when the row has no metrics."""
    if fve is not None:
        return fve <= LOW_CONFIDENCE_FVE
    if relative_rmse is not None:
        return relative_rmse >= LOW_CONFIDENCE_RELATIVE_RMSE
    return None


def repeat_share(text: str) -> float:
    """The largest share of the words that the non-overlapping occurrences of one word n-gram cover (n ≤
    `DEGENERATE_MAX_NGRAM`, counted only with at least `DEGENERATE_MIN_REPEATS` occurrences); 0 for short texts."""
    words = text.lower().split()
    if len(words) < DEGENERATE_MIN_WORDS:
        return 0.0
    best = 0
    for n in range(1, DEGENERATE_MAX_NGRAM + 1):
        counts: dict[tuple[str, ...], int] = {}
        next_free: dict[tuple[str, ...], int] = {}  # where the gram's last counted occurrence ends
        for i in range(len(words) - n + 1):
            gram = tuple(words[i : i + n])
            if i >= next_free.get(gram, 0):
                counts[gram] = counts.get(gram, 0) + 1
                next_free[gram] = i + n
        top = max(counts.values(), default=0)
        if top >= DEGENERATE_MIN_REPEATS:
            best = max(best, top * n)
    return best / len(words)


def script_share(text: str) -> float | None:
    """The share of the text's letters written in a usual script; None with fewer than `SCRIPT_MIN_LETTERS`."""
    letters = [ch for ch in text if ch.isalpha()]
    if len(letters) < SCRIPT_MIN_LETTERS:
        return None
    usual = sum(unicodedata.name(ch, "").split(" ", 1)[0] in USUAL_SCRIPTS for ch in letters)
    return usual / len(letters)


def degenerate(text: str) -> bool:
    share = script_share(text)
    return repeat_share(text) >= DEGENERATE_REPEAT_SHARE or (share is not None and share < SCRIPT_MIN_SHARE)


def row_flags(row: Mapping[str, Any], *, free_length: bool) -> list[str]:
    """The row flags of a finished row (`explanation`, `fve`, `relative_rmse`, `finish_reason`), in `ROW_FLAGS`
    order. `free_length`: the verbalizer stops by itself (only then can an explanation be cut at the budget)."""
    on = (
        bool(low_confidence(row.get("fve"), row.get("relative_rmse"))),
        degenerate(str(row.get("explanation") or "")),
        free_length and row.get("finish_reason") == "length",
    )
    return [name for name, flag in zip(ROW_FLAGS, on, strict=True) if flag]


def with_position_flags(row: dict[str, Any], position_flags: Sequence[str]) -> dict[str, Any]:
    """The row with the position flags of the input it now belongs to and its own row flags: a row taken from
    the result cache was computed for another input, whose positions may have been flagged otherwise (an
    outlier is judged against the whole input's norms)."""
    own = [f for f in row.get("flags") or () if f in ROW_FLAGS]
    return {**row, "flags": [*position_flags, *own], "outlier": "outlier" in position_flags}


def count_flags(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, int]:
    return {name: sum(name in (r.get("flags") or ()) for r in rows) for name in names}
