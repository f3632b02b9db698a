"""Compare two states: the explanation of the difference of two activations, and of each.

A side is an input (a text or chat messages), a position in it and the NLA whose subject reads it, so a diff
can hold one text on two subject models that share a layer and a width (a base and its fine-tune, in one model
group) or two texts on one model. The difference A − B is explained by the first side's NLA with best-of-k,
salience and metrics measured against A − B (as `describe` explains any vector); each side's own activation is
explained by its own NLA, with the token it was taken at.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .analysis import AnalysisError, prepare
from .checkpoint import NLA
from .lens import TunedLens
from .options import ChatMessage, Resolved
from .vectors import describe, encode_vectors

# A difference shorter than this fraction of the larger side's norm is rounding noise, not a direction: the same
# state read twice (one text on one model) differs by exactly 0, and float noise across devices stays far below.
MIN_RELATIVE_NORM = 1e-6


class DiffError(AnalysisError):
    """Two sides that cannot be compared (another layer or width, a position outside the input, no difference)."""


@dataclass(frozen=True)
class Side:
    """One state to compare: an input and the position whose layer-L activation is taken."""

    nla: NLA
    text: str | None = None
    messages: Sequence[ChatMessage | dict[str, str]] | None = None
    position: int = -1
    model_id: str | None = None


def activation(side: Side, *, max_tokens: int | None = None) -> tuple[Tensor, dict[str, Any]]:
    """The side's activation at its position, and the facts a result reports about it."""
    prep = prepare(
        side.nla,
        side.text,
        side.messages,
        {"no_kl": True, "calculate_token_salience": False},
        max_tokens=max_tokens,
    )
    n = len(prep.ids)
    q = side.position + n if side.position < 0 else side.position
    if not 0 <= q < n:
        raise DiffError(f"position {side.position} is outside the {n} tokens of the input")
    vec = prep.acts[q].float()
    facts = {
        "model_id": side.model_id,
        "position": q,
        "token": prep.tokens[q],
        "token_id": prep.ids[q],
        "n_tokens": n,
        "norm": float(vec.norm()),
    }
    return vec, facts


def check_comparable(a: NLA, b: NLA) -> None:
    if a.d_model != b.d_model:
        raise DiffError(f"the sides' activations have different widths ({a.d_model} and {b.d_model})")
    if a.layer != b.layer:
        raise DiffError(f"the sides read different layers ({a.layer} and {b.layer}); a diff needs one layer")


def diff(
    a: Side,
    b: Side,
    options: Resolved,
    *,
    tuned: TunedLens | None = None,
    row_budget: int = 256,
    max_tokens: int | None = None,
    cancelled: Callable[[], bool] | None = None,
    encoding: str = "list",
) -> dict[str, Any]:
    """`{difference, a, b, metadata}`: each a `describe` row (plus the side's position, token and norm)."""
    started = time.perf_counter()
    check_comparable(a.nla, b.nla)
    with torch.no_grad():
        va, fa = activation(a, max_tokens=max_tokens)
        vb, fb = activation(b, max_tokens=max_tokens)
    d = va - vb.to(va.device)
    norm = float(d.norm())
    scale = max(fa["norm"], fb["norm"])
    if not norm > MIN_RELATIVE_NORM * scale:
        raise DiffError(
            f"A − B is zero (‖A − B‖ = {norm:.3g}, ‖A‖ = {fa['norm']:.3g}): the two states are the same, so there "
            "is no difference to explain"
        )

    def explain(nla: NLA, vec: Tensor, token: int | None) -> dict[str, Any]:
        body = describe(
            nla,
            vec.unsqueeze(0),
            options,
            tokens=[token],
            tuned=tuned if nla is a.nla else None,
            row_budget=row_budget,
            cancelled=cancelled,
            encoding=encoding,
        )
        row = {k: v for k, v in body["results"][0].items() if k != "index"}
        if "reconstructions" in body:
            row["reconstruction"] = body["reconstructions"]
        return row

    difference = {**explain(a.nla, d, None), "norm": norm}
    side_a = {**explain(a.nla, va, fa["token_id"]), **fa}
    side_b = {**explain(b.nla, vb, fb["token_id"]), **fb}
    out: dict[str, Any] = {
        "difference": difference,
        "a": side_a,
        "b": side_b,
        "cosine_a_b": float(torch.nn.functional.cosine_similarity(va, vb.to(va.device), dim=0)),
        "metadata": {
            "layer": a.nla.layer,
            "d_model": a.nla.d_model,
            "best_of_k": options.best_of_k,
            "temperature": options.temperature,
            "seed": options.seed,
            "processing_time": round(time.perf_counter() - started, 4),
        },
    }
    if options.return_vectors:
        out["vectors"] = {"a": encode_vectors(va, encoding), "b": encode_vectors(vb, encoding)}
    return out
