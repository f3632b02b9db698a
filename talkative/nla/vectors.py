"""Vectors in, words out (and back): what auditing pipelines ask of an NLA without a text to analyse.

* `describe`: explanations of arbitrary residual vectors (e.g. a steering direction, an SAE feature, a difference
  of means), with best-of-k, salience and the reconstruction metrics, exactly as `analysis.run_batch` scores a
  text's positions: a vector is a position whose activation was given instead of computed.
* `score`: the reconstruction metrics of a given explanation (any text) for a vector.
* `extract`: the activations a text produces at the NLA's layer, at chosen positions (Python-style negative
  indices).
* `tokenize`: the subject's tokens of a text or a rendered chat.

Vectors travel as nested lists or as base64 little-endian float32 with a shape (`decode_vectors`,
`encode_vectors`). The upstream-style reconstructor also reads the token the activation was taken at; a vector
given without one is reconstructed with the reconstructor's neutral token (a lone space, the token salience
ablates with), which is out of distribution for such a reconstructor: results then say `token_assumed: true`.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .analysis import (
    AnalysisError,
    Cancelled,
    Prepared,
    batch_positions,
    check_options,
    objective_score,
    prepare,
    reconstruct_grouped,
    reported_reconstruction,
    run_batch,
    scales_to_norm,
    steer_direction,
    token_salience,
)
from .checkpoint import NLA
from .lens import TunedLens
from .options import ChatMessage, Resolved
from .prompts import encode_piece
from .steering import add_scaled

MAX_VECTORS = 256  # vectors per describe request
MAX_EXPLANATIONS = 64  # explanations per score request
MAX_EXPLANATION_CHARS = 8192
MAX_POSITIONS = 512  # positions per extract request
ENCODINGS = ("list", "base64")


class VectorError(AnalysisError):
    """A vector, token or position the request cannot use; the message says which and why."""


# -- wire format --------------------------------------------------------------------------------------------------
def decode_vectors(value: Any, *, d_model: int, max_rows: int = MAX_VECTORS, what: str = "vectors") -> Tensor:
    """[n, d] float32 from a list of lists (or one list), or from {data: base64 float32 LE, shape, dtype?}.

    A single vector (a flat list or shape [d]) becomes one row. Sizes, finiteness and the model's dimension are
    checked here so the caller gets one precise message.
    """
    if isinstance(value, dict):
        t = _from_base64(value, what)
    elif isinstance(value, list):
        t = _from_lists(value, what)
    else:
        raise VectorError(
            f"{what} must be a list of numbers, a list of such lists, or {{data, shape}} in base64"
        )
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise VectorError(f"{what} must be one vector or a list of vectors, got shape {list(t.shape)}")
    n, d = t.shape
    if n == 0:
        raise VectorError(f"{what} is empty")
    if n > max_rows:
        raise VectorError(f"{what} has {n} vectors, more than the limit of {max_rows} per request")
    if d != d_model:
        raise VectorError(f"{what}: the vectors have {d} values but this model's activations have {d_model}")
    if not bool(torch.isfinite(t).all()):
        raise VectorError(f"{what} contains NaN or infinite values")
    return t


def declared_shape(value: Any) -> tuple[int, int] | None:
    """(rows, values per row) as the wire value states them, without decoding (None when it is malformed).

    Cheap enough for a request handler: a dimension mismatch is refused before any work is queued.
    """
    if isinstance(value, dict):
        shape = value.get("shape")
        if isinstance(shape, list) and len(shape) in (1, 2) and all(isinstance(s, int) for s in shape):
            return (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])
        return None
    if isinstance(value, list) and value:
        if isinstance(value[0], list):
            return len(value), len(value[0])
        return 1, len(value)
    return None


def _from_lists(value: list[Any], what: str) -> Tensor:
    if not value:
        raise VectorError(f"{what} is empty")
    rows = value if value and isinstance(value[0], list) else [value]
    width = {len(r) if isinstance(r, list) else -1 for r in rows}
    if -1 in width:
        raise VectorError(f"{what}: mix of numbers and lists; send one vector or a list of vectors")
    if len(width) > 1:
        raise VectorError(
            f"{what}: the vectors have different lengths ({', '.join(map(str, sorted(width)))})"
        )
    for r in rows:
        for x in r:
            if isinstance(x, bool) or not isinstance(x, int | float):
                raise VectorError(f"{what}: every value must be a number, got {x!r}")
    t = torch.tensor(rows, dtype=torch.float32)
    return t if value and isinstance(value[0], list) else t[0]


def _from_base64(value: dict[str, Any], what: str) -> Tensor:
    unknown = set(value) - {"data", "shape", "dtype", "encoding"}
    if unknown:
        raise VectorError(f"{what}: unknown keys {sorted(unknown)} (expected data, shape, dtype)")
    dtype = value.get("dtype", "float32")
    if dtype != "float32":
        raise VectorError(f"{what}: dtype must be float32 (little-endian), got {dtype!r}")
    encoding = value.get("encoding", "base64")
    if encoding != "base64":
        raise VectorError(f"{what}: encoding must be base64, got {encoding!r}")
    data, shape = value.get("data"), value.get("shape")
    if not isinstance(data, str):
        raise VectorError(f"{what}.data must be a base64 string")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise VectorError(f"{what}.shape must be [d] or [n, d] (non-negative integers)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise VectorError(f"{what}.data is not valid base64") from None
    count = math.prod(shape)
    if len(raw) != 4 * count:
        raise VectorError(
            f"{what}.data holds {len(raw)} bytes, but shape {shape} needs {4 * count} (float32, 4 bytes each)"
        )
    # "<f4" reads little-endian on any host; astype makes a native, writable copy
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape))


def encode_vectors(t: Tensor, encoding: str) -> Any:
    """Nested lists, or {dtype, shape, data} with the float32 little-endian bytes in base64."""
    t = t.detach().float().cpu().contiguous()
    if encoding == "list":
        return t.tolist()
    if encoding == "base64":
        return {
            "dtype": "float32",
            "shape": list(t.shape),
            "data": base64.b64encode(t.numpy().astype("<f4").tobytes()).decode("ascii"),
        }
    raise VectorError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")


# -- current tokens -----------------------------------------------------------------------------------------------
def reads_current_token(nla: NLA) -> bool:
    """Whether the reconstructor's output depends on the token the activation was taken at."""
    return nla.reconstructor.add_current_token


@dataclass
class CurrentToken:
    token_id: int
    token: str
    assumed: bool  # no token was given: the reconstructor's neutral token stands in


def current_tokens(nla: NLA, tokens: Sequence[str | int | None], n: int) -> list[CurrentToken]:
    """One token per vector: a token id, a string that is exactly one subject token, or None (neutral)."""
    if tokens and len(tokens) != n:
        raise VectorError(f"tokens has {len(tokens)} entries for {n} vectors; give one per vector (or none)")
    lm = nla.subject
    vocab = len(lm.tokenizer)
    neutral = nla.reconstructor.space_id
    out: list[CurrentToken] = []
    for i, tok in enumerate(tokens or [None] * n):
        if tok is None:
            out.append(CurrentToken(neutral, lm.tokenizer.decode([neutral]), True))
        elif isinstance(tok, int) and not isinstance(tok, bool):
            if not 0 <= tok < vocab:
                raise VectorError(f"token id {tok} (vector {i}) is outside the vocabulary (0..{vocab - 1})")
            out.append(CurrentToken(tok, lm.tokenizer.decode([tok]), False))
        elif isinstance(tok, str):
            ids = encode_piece(lm, tok)
            if len(ids) != 1:
                raise VectorError(
                    f"token {tok!r} (vector {i}) is {len(ids)} tokens for this model; give exactly one token "
                    "or its token_id"
                )
            out.append(CurrentToken(ids[0], tok, False))
        else:
            raise VectorError(f"token of vector {i} must be a string, an integer id or null, got {tok!r}")
    return out


# -- describe -----------------------------------------------------------------------------------------------------
def describe(
    nla: NLA,
    vectors: Tensor,
    options: Resolved,
    *,
    tokens: Sequence[str | int | None] = (),
    tuned: TunedLens | None = None,
    row_budget: int = 256,
    cancelled: Callable[[], bool] | None = None,
    encoding: str = "list",
) -> dict[str, Any]:
    """Explain each vector (best-of-k, salience, metrics as for a text's positions; no KL: there is no context).

    Rows are `analysis.run_batch` rows without the text-only fields, plus `index` and `token_assumed`; with
    `return_vectors`, `reconstructions` [n, d] in `encoding` (the input vectors are not echoed back). With
    `options.steer`, each vector is steered first and everything is measured against the steered vector.
    """
    if vectors.dim() != 2 or vectors.shape[1] != nla.d_model:
        raise VectorError(f"vectors must be [n, {nla.d_model}], got {list(vectors.shape)}")
    check_options(nla, options, tuned)
    if options.kl:
        raise VectorError(
            "a bare vector has no context to measure KL in; set no_kl (describe does by default)"
        )
    n = vectors.shape[0]
    cur = current_tokens(nla, tokens, n)
    started = time.perf_counter()
    lm = nla.subject
    acts = vectors.to(device=lm.device, dtype=torch.float32)
    direction = steer_direction(nla, options)
    if direction is not None and options.steer is not None:
        acts = add_scaled(acts, direction, options.steer.alpha)  # explained and measured as steered
    prep = Prepared(
        ids=[c.token_id for c in cur],
        tokens=[c.token for c in cur],
        positions=list(range(n)),
        acts=acts,
        options=options,
        seed=options.seed,
    )
    size = batch_positions(nla, options, row_budget)
    timings: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    for b in range(0, n, size):
        if cancelled is not None and cancelled():
            raise Cancelled()
        chunk = list(range(b, min(n, b + size)))
        rows.extend(run_batch(nla, [(prep, chunk)], options, tuned=tuned, timings=timings)[0])
    out: list[dict[str, Any]] = []
    hats: list[Any] = []
    # a vector has no context, so the metrics that need one (KL) are not reported
    context_metrics = {m.name for m in nla.metrics if m.compute is None}
    drop = {"position", "outlier", "flags", "activation", "reconstruction", *context_metrics}
    for row, c in zip(rows, cur, strict=True):
        if options.return_vectors:
            hats.append(row.get("reconstruction"))
        row = {k: v for k, v in row.items() if k not in drop}
        out.append({"index": len(out), **row, "token_assumed": c.assumed})
    body: dict[str, Any] = {
        "results": out,
        "metadata": _meta(nla, options, started, n_vectors=n, batch_size=size, timings=timings),
    }
    if options.return_vectors:
        if any(h is None for h in hats):
            raise VectorError("return_vectors needs the reconstruction metrics: leave no_eval off")
        body["reconstructions"] = encode_vectors(torch.tensor(hats, dtype=torch.float32), encoding)
    return body


# -- score --------------------------------------------------------------------------------------------------------
def explanation_units(nla: NLA, text: str) -> list[int]:
    """The reconstructor's units of a free-text explanation (what it reads and salience ablates)."""
    return nla.reconstructor.text_units(text)


def score(
    nla: NLA,
    vector: Tensor,
    explanations: Sequence[str],
    *,
    token: str | int | None = None,
    salience: bool = False,
    return_vectors: bool = False,
    encoding: str = "list",
) -> dict[str, Any]:
    """The reconstruction metrics of each explanation for one vector (lower mse / higher cosine = more faithful).

    `mse` and `relative_rmse` are in activation units (Â rescaled to ‖A‖ first when the objective is direction-only:
    `metadata.reconstruction_scaled_to_norm`), `nmse` is direction only, `fve` needs the checkpoint's
    variance baseline (null otherwise). With `salience`, each explanation unit's relative score change when it is
    replaced by a space (as in analysis rows).
    """
    if vector.dim() == 2 and vector.shape[0] == 1:
        vector = vector[0]
    if vector.dim() != 1 or vector.shape[0] != nla.d_model:
        raise VectorError(
            f"the vector has {vector.shape[-1] if vector.dim() else 0} values but this model's activations "
            f"have {nla.d_model}"
        )
    if not explanations:
        raise VectorError("give at least one explanation")
    if len(explanations) > MAX_EXPLANATIONS:
        raise VectorError(f"{len(explanations)} explanations, more than the limit of {MAX_EXPLANATIONS}")
    started = time.perf_counter()
    cur = current_tokens(nla, [token], 1)[0]
    units = []
    for i, text in enumerate(explanations):
        if not text.strip():
            raise VectorError(f"explanation {i} is empty")
        if len(text) > MAX_EXPLANATION_CHARS:
            raise VectorError(
                f"explanation {i} has {len(text)} characters, more than {MAX_EXPLANATION_CHARS}"
            )
        try:
            u = explanation_units(nla, text)
        except ValueError as exc:
            raise VectorError(f"explanation {i}: {exc}") from None
        if not u:
            raise VectorError(f"explanation {i} has no tokens")
        units.append(u)
    k = len(units)
    with torch.no_grad():
        A = vector.to(device=nla.subject.device, dtype=torch.float32).unsqueeze(0).expand(k, -1)
        current = torch.full((k,), cur.token_id, dtype=torch.long)
        raw = reconstruct_grouped(nla.reconstructor, units, current).float().to(A.device)
        hats = reported_reconstruction(nla, A, raw)  # on A's scale for direction-only reconstructors
        metrics = nla.metrics.measure(A, hats, nla.fve_variance)
        base = objective_score(nla, A, hats)
        sal = token_salience(nla, A, units, current, base) if salience else [None] * k
    results = []
    for i, text in enumerate(explanations):
        row: dict[str, Any] = {"index": i, "explanation": text}
        for name, value in metrics.items():
            row[name] = None if value is None else _finite(float(value[i]))
        row["token_salience"] = sal[i]
        if salience:
            start, stop = nla.reconstructor.explanation_span(units[i])
            tok = nla.reconstructor.lm.tokenizer
            row["explanation_structured"] = [tok.decode([u]) for u in units[i][start:stop]]
        results.append(row)
    body: dict[str, Any] = {
        "results": results,
        "token": cur.token,
        "token_id": cur.token_id,
        "token_assumed": cur.assumed,
        "norm": float(vector.float().norm()),
        "metadata": _meta(nla, None, started),
    }
    if return_vectors:
        body["reconstructions"] = encode_vectors(hats, encoding)
    return body


# -- extract and tokenize -----------------------------------------------------------------------------------------
def extract(
    nla: NLA,
    text: str | None = None,
    messages: Sequence[ChatMessage | dict[str, str]] | None = None,
    *,
    positions: Sequence[int] | None = None,
    max_tokens: int | None = None,
    max_positions: int = MAX_POSITIONS,
    encoding: str = "list",
) -> dict[str, Any]:
    """Activations after block `layer` at the chosen positions (all when None), in position order, as one
    [n, d] `activations` matrix in `encoding` beside the per-token facts (row i belongs to `tokens[i]`)."""
    started = time.perf_counter()
    if positions is not None and len(positions) > max_positions:
        raise VectorError(f"{len(positions)} positions requested, more than the limit of {max_positions}")
    prep = prepare(
        nla,
        text,
        messages,
        {"no_kl": True, "calculate_token_salience": False},
        max_tokens=max_tokens,
        positions=positions,
    )
    if len(prep.positions) > max_positions:
        raise VectorError(
            f"the input has {len(prep.ids)} tokens; extract returns at most {max_positions} positions per "
            "request: choose some with positions (negative indices count from the end)"
        )
    acts = prep.acts[prep.positions].float().cpu()
    norms = acts.norm(dim=-1).tolist()
    return {
        "layer": nla.layer,
        "d_model": nla.d_model,
        "prompt": prep.text,
        "n_tokens": len(prep.ids),
        "tokens": [
            {"position": q, "token": prep.tokens[q], "token_id": prep.ids[q], "norm": norm}
            for q, norm in zip(prep.positions, norms, strict=True)
        ],
        "activations": encode_vectors(acts, encoding),
        "metadata": _meta(nla, None, started),
    }


def tokenize(
    nla: NLA,
    text: str | None = None,
    messages: Sequence[ChatMessage | dict[str, str]] | None = None,
    *,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """The subject's tokens of a text, or of messages rendered with its chat template (as analysis renders them)."""
    from .analysis import render_messages

    if (text is None) == (messages is None):
        raise VectorError("give exactly one of text or messages")
    rendered = text if text is not None else render_messages(nla, messages or [])
    lm = nla.subject
    ids = lm.encode(rendered)
    if max_tokens is not None and len(ids) > max_tokens:
        raise VectorError(f"the input has {len(ids)} tokens, more than the limit of {max_tokens}")
    return {
        "prompt": rendered,
        "n_tokens": len(ids),
        "tokens": [
            {"position": i, "token": lm.tokenizer.decode([t]), "token_id": t} for i, t in enumerate(ids)
        ],
    }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _meta(
    nla: NLA,
    options: Resolved | None,
    started: float,
    *,
    n_vectors: int | None = None,
    batch_size: int | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "model": nla.name,
        "subject": nla.subject_source,
        "layer": nla.layer,
        "d_model": nla.d_model,
        "objective": nla.objective,
        "reconstruction_scaled_to_norm": scales_to_norm(nla),
        "fve_variance": nla.fve_variance,
        "reads_current_token": reads_current_token(nla),
        "processing_time": round(time.perf_counter() - started, 4),
    }
    if options is not None:
        meta.update(
            {
                "best_of_k": options.best_of_k,
                "temperature": options.temperature,
                "seed": options.seed,
                "n_vectors": n_vectors,
                "batch_size": batch_size,
                "stage_seconds": timings or {},
            }
        )
        if options.steer is not None:
            meta["steer"] = options.steer.describe()
    return meta
