"""How often the claims of sampled explanations are true, per kind of claim (`nla/explanations.py`).

Checked against each held-out sample: the stated genre against its document's genre, the words after "Reading:"
(the "quote") against the text of its last RECENT_TOKENS tokens, the first "next likely" token against the
subject's top next tokens stored with the sample (top 5 when the dataset was extracted with `top_k: 5`; the report
says how many). Each kind is reported as the share of explanations that state it, the share of those that are
true, and the share of all explanations with a true claim of that kind (a missing claim counts as not true): the
last is the figure a target is set on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..explanations import RECENT_TOKENS, check_claims, claim_score
from .data import ActivationSet

KINDS = ("genre", "quote", "next")


def sample_evidence(tokenizer: Any, data: ActivationSet, i: int) -> tuple[str, list[str]]:
    """What sample i's claims are checked against: the decoded text of its last RECENT_TOKENS tokens (current token
    included) and its stored top next tokens, decoded (none where the dataset stores none)."""
    ctx = [t for t in data.ctx[i].tolist() if t >= 0]
    nexts = [tokenizer.decode([t]) for t in data.top[i].tolist() if t >= 0]
    return tokenizer.decode(ctx[-RECENT_TOKENS:]), nexts


def claim_report(tokenizer: Any, data: ActivationSet, idx: Tensor, ids: Tensor) -> dict[str, Any]:
    """Parse rate and per-kind truth of one explanation per sample (`ids` [n, T], row i for sample idx[i])."""
    genres = data.genres()
    top = data.top[idx]
    has_top = bool((top >= 0).all())
    n = len(idx)
    parsed = 0
    stated = dict.fromkeys(KINDS, 0)
    true = dict.fromkeys(KINDS, 0)
    for row, i in enumerate(idx.tolist()):
        recent, nexts = sample_evidence(tokenizer, data, i)
        verdict = check_claims(
            tokenizer.decode(ids[row].tolist()), genres[i], recent, nexts if has_top else []
        )
        parsed += verdict.parses
        for kind in KINDS:
            value = getattr(verdict, kind)
            if kind == "next" and not has_top:
                value = None  # nothing to check it against
            if value is not None:
                stated[kind] += 1
                true[kind] += bool(value)
    return {
        "n": n,
        "parse_rate": parsed / n if n else 0.0,
        "top_next_checked": int(top.shape[1]) if has_top else 0,
        **{
            kind: {
                "stated": stated[kind] / n if n else 0.0,
                "true_when_stated": true[kind] / stated[kind] if stated[kind] else None,
                "true": true[kind] / n if n else 0.0,
            }
            for kind in KINDS
        },
    }


def claim_scores(tokenizer: Any, data: ActivationSet, idx: Tensor, ids: Tensor) -> Tensor:
    """[n] `claim_score` of each explanation (`ids` [n, T], row i for sample idx[i]; idx may repeat, as in a GRPO
    group): the share of its claims true of the sample, which GRPO's claim reward adds."""
    genres = data.genres()
    out = []
    for row, i in enumerate(idx.tolist()):
        recent, nexts = sample_evidence(tokenizer, data, i)
        out.append(claim_score(tokenizer.decode(ids[row].tolist()), genres[i], recent, nexts))
    return torch.tensor(out)


def claims_markdown(claims: dict[str, dict[str, Any]]) -> list[str]:
    """The claims table of `eval.md`: one row per explanation source, one column group per kind."""
    lines = [
        "Claims of the explanations (nla/explanations.py), checked against each sample: *stated* is the share of "
        "explanations making the claim, *true* the share of all explanations whose claim is true (a missing "
        "claim counts as not true), *true when stated* among those making it. The selection control's row is "
        "the same check on explanations written for other documents' activations: what chance gives.",
        "",
        "| explanations | parse rate | genre stated / true / true when stated | quote stated / true / when stated "
        "| next token stated / true / when stated |",
        "|---|---|---|---|---|",
    ]

    def cell(c: dict[str, Any]) -> str:
        when = "–" if c["true_when_stated"] is None else f"{c['true_when_stated']:.0%}"
        return f"{c['stated']:.0%} / {c['true']:.0%} / {when}"

    for name, rep in claims.items():
        lines.append(
            f"| {name} | {rep['parse_rate']:.0%} | " + " | ".join(cell(rep[kind]) for kind in KINDS) + " |"
        )
    top = next((rep["top_next_checked"] for rep in claims.values()), 0)
    lines += [
        "",
        f"Next-token claims are checked against the subject's top {top} next tokens."
        if top
        else "The dataset stores no next-token predictions: next-token claims are not checked.",
    ]
    return lines
