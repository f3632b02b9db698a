"""What the tools take and give back, as plain data: the input types of their schemas, compact analysis rows, and
vectors in the wire's two forms.

An agent reads every byte a tool returns, so a row is cut down to what an investigation reads (the token, its
explanation, the metrics, the flags and the few most salient words), and vectors travel as base64 float32 by
default: exact, and about a quarter of the size of a JSON list. Which metrics a row keeps is the server's to say
(its metric legend, `compact_metrics`), so a metric added to the engine's table reaches agents with no list of
names here to keep in step. The bounds below restate the server's own
(`nla/options.py`, `nla/vectors.py`, `serve/settings.py`) so that a tool's schema shows them without importing
the engine; the server checks every request again, and a unit test keeps the two in step.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_BEST_OF_K = 64
MAX_VECTORS = 256  # vectors per describe request
MAX_EXPLANATIONS = 64  # explanations per score request
MAX_EXPLANATION_CHARS = 8192
MAX_POSITIONS = 512  # positions per extract request
MAX_TEXT_CHARS = (
    200_000  # the server's MAX_TEXT_LENGTH is lower by default (20,000) and says so when exceeded
)
MAX_MESSAGES = 10_000
MAX_ID_CHARS = 200
MAX_TOKEN_CHARS = 256
MAX_ALPHA = 10.0  # a steer's alpha, in units of the steered state's own norm
MAX_NEW_TOKENS = 4096
MAX_COMPLETIONS = 16
MAX_ITEM_ID_CHARS = 200
#: items one batch_submit call takes: a tool's arguments are JSON an agent writes; more go as a JSONL upload
MAX_BATCH_ITEMS = 1000

#: how many of an explanation's words a compact row names as the most salient
SALIENT_WORDS = 3


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_TEXT_CHARS)


class PackedVectors(BaseModel):
    """Vectors as the server sends them with `encoding: "base64"`: little-endian float32, row after row."""

    model_config = ConfigDict(extra="forbid")
    data: str = Field(description="base64 of the little-endian float32 values, row after row")
    shape: list[int] = Field(min_length=1, max_length=2, description="[n, d] (or [d] for one vector)")
    dtype: Literal["float32"] = "float32"


class BatchItem(BaseModel):
    """One input of a batch: the caller's id for it, and a text or chat messages."""

    model_config = ConfigDict(extra="forbid")
    id: Annotated[str, Field(min_length=1, max_length=MAX_ITEM_ID_CHARS)] | int = Field(
        description="The caller's id of the item, unique in the batch."
    )
    text: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)] | None = None
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None

    def wire(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class FromInput(BaseModel):
    """Another input's activation, as a direction: a text and the position whose activation to take."""

    model_config = ConfigDict(extra="forbid")
    text: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
    position: int = Field(
        -1, description="The token position (negative counts from the end; default the last)."
    )


class TextDirection(BaseModel):
    """The reconstructor's vector for a text read as an explanation (e.g. "the ocean")."""

    model_config = ConfigDict(extra="forbid")
    text: Annotated[str, Field(min_length=1, max_length=MAX_EXPLANATION_CHARS)]


class FromDirection(BaseModel):
    """Another input's activation at the model's layer (cleaner than a text direction)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_: FromInput = Field(alias="from")


class VectorDirection(BaseModel):
    """A vector of the model's width (a list, or {data, shape} as extract returns it)."""

    model_config = ConfigDict(extra="forbid")
    vector: Annotated[list[float], Field(min_length=1)] | PackedVectors


Direction = TextDirection | FromDirection | VectorDirection
Alpha = Annotated[
    float,
    Field(
        ge=-MAX_ALPHA,
        le=MAX_ALPHA,
        description="How far to push, in units of the state's own norm: the added vector is alpha·‖h‖·unit("
        "direction); 0 changes nothing; text directions push hard already at 0.1-0.2.",
    ),
]


class Steer(BaseModel):
    """Push each activation along a direction before it is explained (and measured against the pushed vector)."""

    model_config = ConfigDict(extra="forbid")
    direction: Direction
    alpha: Alpha

    def wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class Side(BaseModel):
    """One state of a comparison: an input, the position whose activation to take, and optionally its model."""

    model_config = ConfigDict(extra="forbid")
    text: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)] | None = None
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    position: int = Field(
        -1, description="The token position (negative counts from the end; default the last)."
    )
    model_id: Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)] | None = Field(
        None, description="This side's model (another model of the same group, e.g. a fine-tune)."
    )

    @model_validator(mode="after")
    def _one_input(self) -> Side:
        if (self.text is None) == (self.messages is None):
            raise ValueError("give exactly one of text or messages")
        return self

    def wire(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
Messages = Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
ModelId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
Vector = Annotated[list[float], Field(min_length=1)]
Vectors = Annotated[list[Vector], Field(min_length=1, max_length=MAX_VECTORS)] | PackedVectors
Explanation = Annotated[str, Field(min_length=1, max_length=MAX_EXPLANATION_CHARS)]
TokenRef = Annotated[str, Field(max_length=MAX_TOKEN_CHARS)] | int


def message_dicts(messages: Sequence[Message] | None) -> list[dict[str, str]] | None:
    return None if messages is None else [m.model_dump() for m in messages]


# -- vectors --------------------------------------------------------------------------------------------------------
def unpack(value: PackedVectors | Sequence[Sequence[float]]) -> list[list[float]]:
    """Rows of floats from either form; a malformed base64 payload is a ValueError that names the problem."""
    if not isinstance(value, PackedVectors):
        return [list(map(float, row)) for row in value]
    n, d = value.shape if len(value.shape) == 2 else (1, value.shape[0])
    try:
        raw = base64.b64decode(value.data, validate=True)
    except ValueError as error:
        raise ValueError(f"vectors.data is not valid base64: {error}") from None
    if n < 1 or d < 1 or len(raw) != 4 * n * d:
        raise ValueError(f"vectors.data holds {len(raw)} bytes, but shape {value.shape} needs {4 * n * d}")
    flat = struct.unpack(f"<{n * d}f", raw)
    return [list(flat[i * d : (i + 1) * d]) for i in range(n)]


def pack(rows: Sequence[Sequence[float]]) -> dict[str, Any]:
    flat = [float(x) for row in rows for x in row]
    width = len(rows[0]) if rows else 0
    return {
        "data": base64.b64encode(struct.pack(f"<{len(flat)}f", *flat)).decode("ascii"),
        "shape": [len(rows), width],
        "dtype": "float32",
    }


# -- compact rows ---------------------------------------------------------------------------------------------------
def salient_words(row: dict[str, Any], n: int = SALIENT_WORDS) -> list[str] | None:
    """The explanation's words whose removal hurts the reconstruction most (None without salience)."""
    scores, words = row.get("token_salience"), row.get("explanation_structured")
    if not scores or not words or len(scores) != len(words):
        return None
    ranked = sorted(zip(scores, words, strict=True), key=lambda pair: pair[0], reverse=True)
    return [word.strip() for score, word in ranked[:n] if word.strip() and score is not None]


def rounded(value: Any) -> float | None:
    """Four significant digits: what a comparison between tokens needs, in a third of the characters."""
    return None if value is None else float(f"{float(value):.4g}")


def compact_metrics(legend: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """The metrics compact rows keep, from the server's metric legend (`GET /api/v1/metrics/legend`), in its
    order: all but the derived ones, which are functions of another (nmse = 2(1 − cos)) and would say it twice."""
    return tuple(metric["name"] for metric in legend if metric.get("role") != "derived")


def metrics_of(row: dict[str, Any], metrics: Sequence[str]) -> dict[str, float | None]:
    """The row's values of `metrics` (see `compact_metrics`); one without a value (KL turned off, or on a bare
    vector) is left out."""
    return {name: rounded(row[name]) for name in metrics if row.get(name) is not None}


def compact_row(row: dict[str, Any], metrics: Sequence[str]) -> dict[str, Any]:
    """One analysed token: position, token, explanation, its `metrics`, flags, salient words."""
    flags = list(row.get("flags") or [])
    if row.get("outlier") and "outlier" not in flags:
        flags.append("outlier")
    out: dict[str, Any] = {
        "position": row["position"],
        "token": row["token"],
        "explanation": row["explanation"],
        **metrics_of(row, metrics),
        "flags": flags,
    }
    words = salient_words(row)
    if words is not None:
        out["salient_words"] = words
    return out


def compact_analysis(
    request_id: str, rows: Sequence[dict[str, Any]], meta: dict[str, Any], metrics: Sequence[str]
) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "model_id": meta.get("model_id"),
        "layer": meta.get("layer"),
        "n_tokens": meta.get("n_tokens"),
        "best_of_k": meta.get("best_of_k"),
        "rows": [compact_row(r, metrics) for r in rows],
        "summary": compact_summary(meta.get("summary")),
    }


def compact_summary(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """The server's summary (means over unflagged rows, counts of flags) with its means rounded like rows."""
    if summary is None:
        return None
    return {k: rounded(v) if isinstance(v, float) else v for k, v in summary.items()}


# -- batches --------------------------------------------------------------------------------------------------------
def batch_state(body: dict[str, Any]) -> dict[str, Any]:
    """A batch's progress as the API gives it, without its options (the caller set them)."""
    return {
        "batch_id": body["batch_id"],
        "status": body["status"],
        "model_id": body.get("model_id"),
        "items": body.get("items"),
        "positions_per_second": rounded(body.get("positions_per_second")),
        "eta_seconds": rounded(body.get("eta_seconds")),
    }


def batch_result(line: dict[str, Any], metrics: Sequence[str]) -> dict[str, Any]:
    """One finished item: its id and status, and its compact rows and summary or its error."""
    out: dict[str, Any] = {"id": line.get("id"), "status": line["status"]}
    if line.get("error") is not None:
        out["error"] = line["error"]
    if line.get("line") is not None:
        out["line"] = line["line"]
    if "tokens" in line:
        meta = line.get("metadata") or {}
        out |= {
            "request_id": line.get("request_id"),
            "n_tokens": meta.get("n_tokens"),
            "rows": [compact_row(r, metrics) for r in line["tokens"]],
            "summary": compact_summary(meta.get("summary")),
        }
    return out


# -- comparisons and generations ------------------------------------------------------------------------------------
def explained(part: dict[str, Any], metrics: Sequence[str]) -> dict[str, Any]:
    """An explained state of a diff: where it was taken, its explanation, its `metrics`, salient words."""
    out: dict[str, Any] = {
        k: part[k] for k in ("model_id", "position", "token", "token_assumed") if k in part
    }
    out |= {
        "explanation": part.get("explanation"),
        **metrics_of(part, metrics),
        "norm": rounded(part.get("norm")),
    }
    words = salient_words(part)
    if words is not None:
        out["salient_words"] = words
    return out


def compact_diff(body: dict[str, Any], metrics: Sequence[str]) -> dict[str, Any]:
    return {
        "request_id": body.get("request_id"),
        "model_id": body.get("model_id"),
        "difference": explained(body["difference"], metrics),
        "a": explained(body["a"], metrics),
        "b": explained(body["b"], metrics),
        "cosine_a_b": rounded(body.get("cosine_a_b")),
    }
