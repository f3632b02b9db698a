"""Vector endpoints for auditing pipelines (`/api/v1`): describe, score, extract, tokenize.

Each request is a job of its own kind (queued, routed to its model's group, stored, cancellable) and is answered
when it is done; one still running after `REQUEST_TIMEOUT` (or 300 s) is answered 202 with its `request_id` for
`GET /status/{request_id}`. Vectors are JSON lists (one vector, or a list of them) or
`{"data": <base64 of little-endian float32>, "shape": [n, d], "dtype": "float32"}`; `encoding` chooses the form of
vectors in the answer. A dimension mismatch is a 400 naming both sizes, refused before queueing when the model
is loaded.

The upstream-style reconstructor also reads the token an activation was taken at: give `tokens` (one token
string, or a token id, per vector) when you know it. Without one, the reconstructor's neutral token (a lone space)
stands in and the result says `token_assumed: true`; its metrics then describe the vector read in a context it
was not trained on. Reconstructors that do not read the token (official ones) ignore it
(`metadata.reads_current_token`).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, Field, model_validator

from ....nla import vectors as V
from ....nla.options import MAX_MESSAGES, AnalyzeOptions, ChatMessage
from ...catalog import visibility
from ...catalog.registry import UnknownModel
from ...errors import failure_status, http_error
from ...jobs.record import CANCELLED, COMPLETED, FAILED
from ...scheduling.types import SchedulerError
from ...service import Service
from ..deps import ClientIdentity, client_identity, service_of
from ..schemas import MAX_ID_CHARS, ErrorBody
from ..strict import StrictBody

router = APIRouter(
    prefix="/api/v1",
    tags=["vectors"],
    dependencies=[Depends(client_identity)],
    responses={
        400: {"model": ErrorBody},
        403: {"model": ErrorBody},
        404: {"model": ErrorBody},
        503: {"model": ErrorBody},
    },
)
DEFAULT_WAIT = 300.0
MAX_TOKEN_CHARS = 256  # a token given as a string is one token: longer ones are refused before tokenizing
TokenRef = Annotated[str, Field(max_length=MAX_TOKEN_CHARS)] | int
Encoding = Literal["list", "base64"]


VECTORS_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        {"type": "array", "items": {"type": "number"}},
        {
            "type": "object",
            "description": "base64 of the little-endian float32 bytes, row after row",
            "properties": {
                "data": {"type": "string"},
                "shape": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
                "dtype": {"type": "string", "enum": ["float32"]},
            },
            "required": ["data", "shape"],
        },
    ]
}


def _vectors_field(description: str) -> Any:
    """Decoded and checked by the engine (precise messages), not by pydantic (a union's errors are unreadable)."""
    return Field(description=description, json_schema_extra=VECTORS_SCHEMA)


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


class Texty(StrictBody):
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, min_length=1)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    model_id: str | None = Field(None, max_length=MAX_ID_CHARS)

    @model_validator(mode="after")
    def _one_input(self) -> Texty:
        if (self.text is None) == (self.messages is None):
            raise ValueError("give exactly one of text or messages")
        return self

    def input(self) -> dict[str, Any]:
        if self.text is not None:
            return {"text": self.text}
        return {"messages": [m.model_dump() for m in self.messages or []]}

    def length(self) -> int:
        return len(self.text) if self.text is not None else sum(len(m.content) for m in self.messages or [])


class DescribeRequest(StrictBody):
    model_config = ConfigDict(extra="forbid")
    vectors: Any = _vectors_field("One vector or up to 256, each with the model's d values.")
    tokens: list[TokenRef | None] | None = Field(
        None,
        max_length=V.MAX_VECTORS,
        description="Per vector: the token (a string that is one token, or its id) the activation was taken at.",
    )
    model_id: str | None = Field(None, max_length=MAX_ID_CHARS)
    options: AnalyzeOptions | None = Field(
        None, description="Analysis options (best_of_k, temperature, seed, salience, lenses, return_vectors)."
    )
    encoding: Encoding = "list"

    @model_validator(mode="after")
    def _options(self) -> DescribeRequest:
        o = self.options
        if o is not None and (o.last_n_messages is not None or o.use_chat_format is not None):
            raise ValueError("last_n_messages and use_chat_format apply to chat input, not to vectors")
        if o is not None and "no_kl" in o.model_fields_set and not o.no_kl:
            raise ValueError("a bare vector has no context to measure KL in; leave no_kl out")
        return self


class ScoreRequest(StrictBody):
    model_config = ConfigDict(extra="forbid")
    explanation: str | None = Field(None, max_length=V.MAX_EXPLANATION_CHARS, description="A text to score.")
    explanations: list[Annotated[str, Field(max_length=V.MAX_EXPLANATION_CHARS)]] | None = Field(
        None, min_length=1, max_length=V.MAX_EXPLANATIONS, description="Several texts for the same vector."
    )
    vector: Any = _vectors_field("The vector (d values).")
    token: TokenRef | None = Field(None, description="The token the activation was taken at (or its id).")
    model_id: str | None = Field(None, max_length=MAX_ID_CHARS)
    calculate_token_salience: bool = Field(False, description="Per explanation token: the score's change.")
    return_vectors: bool = Field(False, description="Also return each reconstruction.")
    encoding: Encoding = "list"

    @model_validator(mode="after")
    def _one_input(self) -> ScoreRequest:
        if (self.explanation is None) == (self.explanations is None):
            raise ValueError("give exactly one of explanation or explanations")
        return self


class ExtractRequest(Texty):
    positions: list[int] | None = Field(
        None,
        max_length=V.MAX_POSITIONS,
        description="Token positions (negative counts from the end); default all (at most 512).",
    )
    encoding: Encoding = "list"


class TokenizeRequest(Texty):
    pass


# -- running --------------------------------------------------------------------------------------------------------
def _check_dimension(svc: Service, model_id: str, value: Any, what: str) -> int | None:
    """The declared number of vectors; a dimension mismatch is refused at once when the model is loaded."""
    shape = V.declared_shape(value)
    loaded = svc.scheduler.runtime_for(model_id)
    if shape is not None and loaded is not None:
        d = loaded[1].d_model
        if shape[1] != d:
            raise HTTPException(
                400, f"{what}: the vectors have {shape[1]} values but model {model_id}'s activations have {d}"
            )
    return shape[0] if shape is not None else None


async def _run(
    request: Request, who: ClientIdentity, kind: str, job_request: dict[str, Any], model_id: str
) -> Any:
    svc = service_of(request)
    try:
        job = await svc.scheduler.submit(kind, job_request, model_id=model_id, owner=who.key)
    except (SchedulerError, UnknownModel) as exc:
        raise http_error(exc) from None
    job = await svc.scheduler.wait(job.id, timeout=svc.settings.request_timeout or DEFAULT_WAIT)
    if job.status == COMPLETED:
        return {"request_id": job.id, "model_id": job.model_id, **(job.result or {})}
    if job.status == FAILED:
        raise HTTPException(failure_status(job.error), job.error or "failed")
    if job.status == CANCELLED:
        raise HTTPException(409, job.error or "the request was cancelled")
    return JSONResponse(
        {
            "request_id": job.id,
            "status": job.status,
            "message": f"still {job.status}; follow it with GET /status/{job.id}",
        },
        status_code=202,
    )


def _model(svc: Service, model_id: str | None, who: ClientIdentity) -> str:
    try:
        return visibility.resolve(svc.scheduler, model_id, who)
    except (SchedulerError, UnknownModel) as exc:
        raise http_error(exc) from None


@router.post("/describe", summary="Explanations and reconstruction metrics of given vectors")
async def describe(
    body: DescribeRequest, request: Request, who: ClientIdentity = Depends(client_identity)
) -> Any:
    """Each vector is explained as an analysis explains a token's activation (best-of-k, salience, metrics),
    without KL (a bare vector has no context). Answer: `results[i]` = `{index, token, token_id, token_assumed,
    explanation, explanation_structured, token_salience, mse, relative_rmse, cosine, nmse, fve, norm,
    logit_lens_top, tuned_lens_top}`, `metadata`, and with `options.return_vectors` the `reconstructions`."""
    svc = service_of(request)
    model_id = _model(svc, body.model_id, who)
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
    return await _run(request, who, "describe", job_request, model_id)


@router.post("/score", summary="The reconstruction metrics of a text (an explanation) for a vector")
async def score(body: ScoreRequest, request: Request, who: ClientIdentity = Depends(client_identity)) -> Any:
    """Answer: `results[i]` = `{index, explanation, mse, relative_rmse, cosine, nmse, fve, token_salience}` per
    explanation, plus `token`, `token_id`, `token_assumed`, the vector's `norm`, `metadata` and, with
    `return_vectors`, the `reconstructions`."""
    svc = service_of(request)
    model_id = _model(svc, body.model_id, who)
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
    return await _run(request, who, "score", job_request, model_id)


@router.post("/extract", summary="Activations of a text at the model's layer")
async def extract(
    body: ExtractRequest, request: Request, who: ClientIdentity = Depends(client_identity)
) -> Any:
    """Answer: `{layer, d_model, prompt, n_tokens, tokens: [{position, token, token_id, norm}], activations}`
    with `activations[i]` the vector of `tokens[i]` (positions sorted, duplicates once)."""
    svc = service_of(request)
    if body.length() > svc.settings.max_text_length:
        raise HTTPException(400, f"the input has {body.length()} characters, more than MAX_TEXT_LENGTH")
    model_id = _model(svc, body.model_id, who)
    job_request = {**body.input(), "positions": body.positions, "encoding": body.encoding}
    return await _run(request, who, "extract", job_request, model_id)


@router.post("/tokenize", summary="The model's tokens of a text or a rendered chat")
async def tokenize(
    body: TokenizeRequest, request: Request, who: ClientIdentity = Depends(client_identity)
) -> Any:
    """Answer: `{prompt, n_tokens, tokens: [{position, token, token_id}]}`; `prompt` is the text the tokens
    come from (for messages: rendered with the chat template, as analysis renders them)."""
    svc = service_of(request)
    if body.length() > svc.settings.max_text_length:
        raise HTTPException(400, f"the input has {body.length()} characters, more than MAX_TEXT_LENGTH")
    model_id = _model(svc, body.model_id, who)
    return await _run(request, who, "tokenize", body.input(), model_id)
