"""Vector endpoints for auditing pipelines (`/api/v1`): describe, score, extract, tokenize.

Each request is a job of its own kind (queued, routed to its model's group, stored, cancellable) and is answered
when it is done; one still running after `REQUEST_TIMEOUT` (or 300 s) is answered 202 with its `request_id` for
`GET /status/{request_id}`. Vectors are JSON lists (one vector, or a list of them) or
`{"data": <base64 of little-endian float32>, "shape": [n, d], "dtype": "float32"}`; `encoding` chooses the form of
vectors in the answer. A dimension mismatch is a 400 naming both sizes, refused before queueing when the model
is loaded.

A reconstructor that reads the token an activation was taken at as well as the activation
(`metadata.reads_current_token`) is told that token when the request gives `tokens` (one token string, or a token
id, per vector). Without one, the reconstructor's neutral token (a lone space) stands in and the result says
`token_assumed: true`; its metrics then describe the vector read in a context it was not trained on. Other
reconstructors ignore it.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import HTTPException

from ....nla import vectors as V
from ...service import Service
from ..deps import Identity, ServiceDep, model_for
from ..schemas import DescribeRequest, ExtractRequest, ScoreRequest, TokenizeRequest
from ..vector_jobs import run_vector_job, vector_router

router = vector_router()


def _wire(value: Any, what: str) -> Any:
    if V.declared_shape(value) is None:
        raise HTTPException(
            400,
            f"{what} must be a list of numbers, a list of such lists, or {{data, shape}} with base64 float32",
        )
    if isinstance(value, list) and not _all_finite(value):
        # JSON parsing accepts NaN and Infinity; such a request would never pass the engine's own check, and the
        # job store refuses to write it
        raise HTTPException(400, f"{what} contains NaN or infinite values")
    return value


def _all_finite(value: list[Any]) -> bool:
    """False when a number of a JSON-list vector (or list of vectors) is NaN or infinite; other malformed entries
    are left to the engine, whose message names them."""
    rows = value if value and isinstance(value[0], list) else [value]
    for row in rows:
        if not isinstance(row, list):
            continue
        try:
            if not all(map(math.isfinite, row)):  # C speed for the usual all-number row
                return False
        except (TypeError, OverflowError):
            if not all(map(_finite_number, row)):
                return False
    return True


def _finite_number(x: Any) -> bool:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return True  # not a number at all: the engine's message says so
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer beyond float range
        return False


# -- running --------------------------------------------------------------------------------------------------------
def _check_dimension(svc: Service, model_id: str, value: Any, what: str) -> int | None:
    """The declared number of vectors; a dimension mismatch is refused at once when the model is loaded."""
    shape = V.declared_shape(value)
    loaded = svc.scheduler.loaded_model(model_id)
    if shape is not None and loaded is not None:
        d = loaded[1]["d_model"]
        if shape[1] != d:
            raise HTTPException(
                400, f"{what}: the vectors have {shape[1]} values but model {model_id}'s activations have {d}"
            )
    return shape[0] if shape is not None else None


def _check_length(svc: Service, body: ExtractRequest | TokenizeRequest) -> None:
    if body.text_length() > svc.settings.max_text_length:
        raise HTTPException(400, f"the input has {body.text_length()} characters, more than MAX_TEXT_LENGTH")


@router.post("/describe", summary="Explanations and reconstruction metrics of given vectors")
async def describe(body: DescribeRequest, svc: ServiceDep, who: Identity) -> Any:
    """Each vector is explained as an analysis explains a token's activation (best-of-k, salience, metrics),
    without KL (a bare vector has no context). Answer: `results[i]` = `{index, token, token_id, token_assumed,
    explanation, explanation_structured, token_salience, mse, relative_rmse, cosine, nmse, fve, norm,
    logit_lens_top, tuned_lens_top}`, `metadata`, and with `options.return_vectors` the `reconstructions`."""
    model_id = await model_for(svc, body.model_id, who)
    vectors = _wire(body.vectors, "vectors")
    n = _check_dimension(svc, model_id, vectors, "vectors")
    if n is not None and n > V.MAX_VECTORS:
        raise HTTPException(
            400, f"vectors has {n} vectors, more than the limit of {V.MAX_VECTORS} per request"
        )
    if body.tokens is not None and n is not None and len(body.tokens) != n:
        raise HTTPException(
            400, f"tokens has {len(body.tokens)} entries for {n} vectors; give one per vector"
        )
    job_request = {
        "vectors": vectors,
        "tokens": body.tokens,
        "options": body.options.model_dump(exclude_unset=True) if body.options else {},
        "encoding": body.encoding,
    }
    return await run_vector_job(svc, who, "describe", job_request, model_id)


@router.post("/score", summary="The reconstruction metrics of a text (an explanation) for a vector")
async def score(body: ScoreRequest, svc: ServiceDep, who: Identity) -> Any:
    """Answer: `results[i]` = `{index, explanation, mse, relative_rmse, cosine, nmse, fve, token_salience}` per
    explanation, plus `token`, `token_id`, `token_assumed`, the vector's `norm`, `metadata` and, with
    `return_vectors`, the `reconstructions`."""
    model_id = await model_for(svc, body.model_id, who)
    vector = _wire(body.vector, "vector")
    n = _check_dimension(svc, model_id, vector, "vector")
    if n is not None and n != 1:
        raise HTTPException(400, f"vector holds {n} vectors; score takes one (describe takes many)")
    job_request = {
        "vector": vector,
        "explanations": body.explanations if body.explanations is not None else [body.explanation],
        "token": body.token,
        "salience": body.calculate_token_salience,
        "return_vectors": body.return_vectors,
        "encoding": body.encoding,
    }
    return await run_vector_job(svc, who, "score", job_request, model_id)


@router.post("/extract", summary="Activations of a text at the model's layer")
async def extract(body: ExtractRequest, svc: ServiceDep, who: Identity) -> Any:
    """Answer: `{layer, d_model, prompt, n_tokens, tokens: [{position, token, token_id, norm}], activations}`
    with `activations[i]` the vector of `tokens[i]` (positions sorted, duplicates once)."""
    _check_length(svc, body)
    model_id = await model_for(svc, body.model_id, who)
    job_request = {**body.input(), "positions": body.positions, "encoding": body.encoding}
    return await run_vector_job(svc, who, "extract", job_request, model_id)


@router.post("/tokenize", summary="The model's tokens of a text or a rendered chat")
async def tokenize(body: TokenizeRequest, svc: ServiceDep, who: Identity) -> Any:
    """Answer: `{prompt, n_tokens, tokens: [{position, token, token_id}]}`; `prompt` is the text the tokens
    come from (for messages: rendered with the chat template, as analysis renders them)."""
    _check_length(svc, body)
    model_id = await model_for(svc, body.model_id, who)
    return await run_vector_job(svc, who, "tokenize", body.input(), model_id)
