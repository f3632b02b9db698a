"""The wire bodies of the REST and WebSocket APIs (one definition for both), and their conversion to what a job
stores.

Domain code never imports this module: a route validates a body here and hands the service plain values
(`AnalyzeRequest.engine_request()` is what an analysis job stores). Every body is a `StrictBody`
(`strict.py`): numbers and booleans must be JSON numbers and booleans. The rules several bodies share are written
once: `TextOrMessages` (exactly one of a text or chat messages, their length limits, the characters counted
against MAX_TEXT_LENGTH) and the `ModelId` / `ClientRequestId` limits.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from ...nla import vectors as V
from ...nla.options import MAX_MESSAGES, AnalyzeOptions, ChatMessage, GenerationSteerOption
from ..jobs.record import text_length
from .strict import StrictBody, loose_scalars

MAX_ID_CHARS = 200  # model and group ids: registry keys, far shorter in practice
MAX_CLIENT_ID_CHARS = 200  # a client's own request id, echoed back: bounded so echoes stay small


def _no_nul(value: str) -> str:
    """Refuse NUL in strings the store keeps in a column of their own: PostgreSQL's text type cannot hold it, so
    such a value would fail at the write, after the client was told nothing (texts and messages are stored inside
    JSON, where NUL is escaped, and stay accepted)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


NoNul = AfterValidator(_no_nul)
ModelId = Annotated[str, Field(max_length=MAX_ID_CHARS), NoNul]
ClientRequestId = Annotated[str, Field(max_length=MAX_CLIENT_ID_CHARS), NoNul]
Text = Annotated[str, Field(min_length=1)]
Messages = Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]


class TextOrMessages(StrictBody):
    """A body whose input is a text or chat messages, never both, never neither."""

    model_config = ConfigDict(extra="forbid")
    text: Text | None = None
    messages: Messages | None = Field(None, description="Chat messages, oldest first.")
    model_id: ModelId | None = None

    @model_validator(mode="after")
    def _exactly_one_input(self) -> TextOrMessages:
        if (self.text is None) == (self.messages is None):
            raise ValueError("give exactly one of text or messages")
        return self

    def input(self) -> dict[str, Any]:
        """The input as a job stores it: `{text}` or `{messages: [{role, content}]}`."""
        if self.text is not None:
            return {"text": self.text}
        return {"messages": [m.model_dump() for m in self.messages or []]}

    def text_length(self) -> int:
        """The characters counted against MAX_TEXT_LENGTH: the text, or every message's content."""
        return text_length(self.input())


# -- analysis and models --------------------------------------------------------------------------------------------
class AnalyzeRequest(TextOrMessages):
    """`POST /analyze` and the WebSocket `analyze` message: text or chat messages, a model, the engine's options."""

    text: Text | None = Field(None, description="Text to analyse (or give `messages`).")
    messages: Messages | None = Field(
        None, description="Chat messages, oldest first; the model's chat template renders them."
    )
    model_id: ModelId | None = Field(
        None, description="Model to run on; default: the server's current model."
    )
    options: AnalyzeOptions | None = Field(None, description="Analysis options; absent = all defaults.")
    client_request_id: ClientRequestId | None = Field(
        None, description="Echoed in every message about this request."
    )

    @model_validator(mode="after")
    def _text_fits_options(self) -> AnalyzeRequest:
        if self.text is not None and not self.text.strip():
            raise ValueError("text is empty")
        if self.text is not None and self.options is not None and self.options.last_n_messages is not None:
            raise ValueError("options.last_n_messages applies to chat messages only; send messages, not text")
        return self

    def engine_request(self) -> dict[str, Any]:
        """What the job stores: the input and only the options the client set (so model defaults still apply)."""
        return {
            "options": self.options.model_dump(exclude_unset=True) if self.options else {},
            **self.input(),
        }


class AnalyzeAccepted(BaseModel):
    request_id: str
    status: Literal["queued"] = "queued"
    queue_position: int | None
    queue_size: int


class SwitchRequest(StrictBody):
    model_config = ConfigDict(extra="forbid")
    model_id: ModelId = Field(min_length=1)
    client_request_id: ClientRequestId | None = None


class ModelInfo(BaseModel):
    model_id: str
    group_id: str
    is_loaded: bool


class SwitchResponse(BaseModel):
    status: Literal["success", "queued"]
    model_id: str
    group_id: str
    message: str
    group_switched: bool
    model_info: ModelInfo
    request_id: str


class CancelResponse(BaseModel):
    request_id: str
    status: Literal["cancelled"] = "cancelled"
    message: str


class RootResponse(BaseModel):
    name: str = "Consistency Lens API"
    version: str = "1.0.0"
    status: str = "running"


class ErrorBody(BaseModel):
    detail: str


# -- generation -------------------------------------------------------------------------------------------------------
MAX_NEW_TOKENS = 4096
MAX_COMPLETIONS = 16
LENGTH_ALIASES = ("max_new_tokens", "max_length", "num_tokens")


class GenerateOptions(BaseModel):
    """Sampling settings of a generation; absent ones come from the model's `generation_config`."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        le=MAX_NEW_TOKENS,
        description="Most tokens to generate per completion (aliases: max_length, num_tokens).",
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass (default 0.95).")
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="Same seed, same completions (default 42)."
    )
    num_completions: int | None = Field(None, ge=1, le=MAX_COMPLETIONS, description="Independent samples.")
    stop_at_end_of_turn: bool = Field(True, description="Stop a completion at the end of turn / EOS token.")
    model_id: ModelId | None = Field(
        None, description="The seed's place for the model (same as the top-level one)."
    )
    steer: GenerationSteerOption | None = Field(
        None, description="Add a direction to the residual stream at the model's layer while it generates."
    )

    @model_validator(mode="before")
    @classmethod
    def _length_aliases(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        given = {k: data[k] for k in LENGTH_ALIASES if data.get(k) is not None}
        if len(set(map(str, given.values()))) > 1:
            raise ValueError(f"{' and '.join(given)} disagree; give one of them")
        out = {k: v for k, v in data.items() if k not in LENGTH_ALIASES}
        if given:
            out["max_new_tokens"] = next(iter(given.values()))
        return out


class GenerateRequest(TextOrMessages):
    """`POST /generate` and the WebSocket `generate` message: continue a text, or a chat (a trailing assistant
    message is continued, otherwise a new assistant turn starts)."""

    text: Text | None = Field(None, description="Prompt to continue (or give `messages`).")
    model_id: ModelId | None = Field(
        None, description="Model to run on; default: the server's current model."
    )
    options: GenerateOptions | None = None
    client_request_id: ClientRequestId | None = None

    @model_validator(mode="after")
    def _one_model(self) -> GenerateRequest:
        inner = self.options.model_id if self.options is not None else None
        if inner is not None and self.model_id is not None and inner != self.model_id:
            raise ValueError(f"model_id {self.model_id!r} and options.model_id {inner!r} disagree")
        if self.model_id is None and inner is not None:
            self.model_id = inner
        return self

    def engine_request(self) -> dict[str, Any]:
        """What the generation kind takes: the input and only the sampling options the client set (the model's
        generation_config fills in the rest)."""
        options = self.options.model_dump(exclude_none=True, exclude={"model_id"}) if self.options else {}
        return {"options": options, **self.input()}


# -- the slim API -----------------------------------------------------------------------------------------------------
class SlimRequest(StrictBody):
    """The slim API's bodies: chat messages on a model group, few knobs (the rest is fixed by the routes)."""

    model_config = ConfigDict(extra="forbid")
    messages: Messages = Field(description="The conversation so far, oldest first.")
    model_group: ModelId = Field(min_length=1, description="A group id (GET /api/slim/models).")
    model_id: ModelId | None = Field(None, description="A model of that group; default: its first model.")
    client_request_id: ClientRequestId | None = None


def _temperature(v: float) -> float:
    """Below 0.1 sampling is greedy in all but name; 0 says greedy plainly."""
    if 0 < v < 0.1:
        raise ValueError("temperature must be 0 (greedy) or between 0.1 and 2.0")
    return v


class SlimGenerate(SlimRequest):
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    n_continuations: int = Field(1, ge=1, le=10, description="Independent continuations.")
    n_tokens: int = Field(100, ge=1, le=512, description="Most new tokens per continuation.")
    steer: GenerationSteerOption | None = Field(None, description="As `options.steer` of POST /generate.")
    _t = field_validator("temperature")(_temperature)


class SlimAnalyze(SlimRequest):
    calculate_token_salience: bool = True
    best_of_k: int = Field(8, ge=1, le=32)
    last_n_messages: int | None = Field(None, ge=1, description="Analyse only the last N messages.")


class SlimSendMessage(SlimRequest):
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    max_tokens: int = Field(1024, ge=1, le=4096, description="Most tokens of the reply.")
    _t = field_validator("temperature")(_temperature)


class SlimAccepted(BaseModel):
    request_id: str
    status: str
    queue_position: int | None
    queue_size: int
    model_id: str
    model_group: str


# -- vectors ----------------------------------------------------------------------------------------------------------
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


class DescribeRequest(StrictBody):
    """`POST /api/v1/describe`: explain given vectors as an analysis explains a token's activation."""

    model_config = ConfigDict(extra="forbid")
    vectors: Any = _vectors_field("One vector or up to 256, each with the model's d values.")
    tokens: list[TokenRef | None] | None = Field(
        None,
        max_length=V.MAX_VECTORS,
        description="Per vector: the token (a string that is one token, or its id) the activation was taken at.",
    )
    model_id: ModelId | None = None
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
    """`POST /api/v1/score`: the reconstruction metrics of given texts for one vector."""

    model_config = ConfigDict(extra="forbid")
    explanation: str | None = Field(None, max_length=V.MAX_EXPLANATION_CHARS, description="A text to score.")
    explanations: list[Annotated[str, Field(max_length=V.MAX_EXPLANATION_CHARS)]] | None = Field(
        None, min_length=1, max_length=V.MAX_EXPLANATIONS, description="Several texts for the same vector."
    )
    vector: Any = _vectors_field("The vector (d values).")
    token: TokenRef | None = Field(None, description="The token the activation was taken at (or its id).")
    model_id: ModelId | None = None
    calculate_token_salience: bool = Field(False, description="Per explanation token: the score's change.")
    return_vectors: bool = Field(False, description="Also return each reconstruction.")
    encoding: Encoding = "list"

    @model_validator(mode="after")
    def _one_input(self) -> ScoreRequest:
        if (self.explanation is None) == (self.explanations is None):
            raise ValueError("give exactly one of explanation or explanations")
        return self


class ExtractRequest(TextOrMessages):
    """`POST /api/v1/extract`: a text's activations at the model's layer."""

    positions: list[int] | None = Field(
        None,
        max_length=V.MAX_POSITIONS,
        description="Token positions (negative counts from the end); default all (at most 512).",
    )
    encoding: Encoding = "list"


class TokenizeRequest(TextOrMessages):
    """`POST /api/v1/tokenize`: a text's tokens, or a rendered chat's."""


# -- batches ----------------------------------------------------------------------------------------------------------
MAX_ITEM_ID_CHARS = 200  # an item's id is echoed on its result line: bounded so lines stay small
ItemId = Annotated[str, Field(min_length=1, max_length=MAX_ITEM_ID_CHARS), NoNul] | int


class BatchItem(TextOrMessages):
    """One item of a batch: the client's id, a text or chat messages, and options over the batch's defaults."""

    id: ItemId = Field(
        description="The client's id of the item (a string or an integer), unique in the batch."
    )
    text: Text | None = Field(None, description="Text to analyse (or give `messages`).")
    options: dict[str, Any] | None = Field(
        None, description="Analysis options over the batch's `options` (each key given here wins)."
    )

    @field_validator("id", mode="before")
    @classmethod
    def _id_is_a_string_or_an_integer(cls, v: Any) -> Any:
        if not isinstance(v, str | int) or isinstance(v, bool):
            raise ValueError("an item's id must be a string or an integer")
        return v

    @model_validator(mode="after")
    def _no_own_model(self) -> BatchItem:
        if self.model_id is not None:
            raise ValueError("model_id is the batch's: give it once, beside items")
        if self.text is not None and not self.text.strip():
            raise ValueError("text is empty")
        return self

    def engine_request(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """What the item's analysis job stores: its input and the options set by the batch or by the item,
        checked as one `AnalyzeOptions` (unknown keys and out-of-range values are refused)."""
        merged = {**defaults, **(self.options or {})}
        problem = loose_scalars(AnalyzeOptions, merged, "options")
        if problem:
            raise ValueError(problem)
        options = AnalyzeOptions.model_validate(merged)
        if self.text is not None and options.last_n_messages is not None:
            raise ValueError("options.last_n_messages applies to chat messages only; send messages, not text")
        return {"options": options.model_dump(exclude_unset=True), **self.input()}


class BatchDefaults(StrictBody):
    """What a batch's items share: the model (default: the caller's current model) and default options."""

    model_config = ConfigDict(extra="forbid")
    model_id: ModelId | None = Field(
        None, description="Model every item runs on; default: your current model."
    )
    options: AnalyzeOptions | None = Field(None, description="Options of every item (an item's own win).")

    def option_defaults(self) -> dict[str, Any]:
        return self.options.model_dump(exclude_unset=True) if self.options else {}


class BatchRequest(BatchDefaults):
    """`POST /api/v1/batches` as JSON: the items and their shared defaults."""

    items: list[BatchItem] = Field(min_length=1, description="The items, in the order they are submitted.")

    @model_validator(mode="after")
    def _unique_ids(self) -> BatchRequest:
        seen: set[str] = set()
        for i, item in enumerate(self.items):
            key = json.dumps(item.id)
            if key in seen:
                raise ValueError(
                    f"items.{i}.id: {item.id!r} is the id of an earlier item; ids must be unique"
                )
            seen.add(key)
        return self


class BatchItemCounts(BaseModel):
    total: int
    done: int
    completed: int
    failed: int
    cancelled: int
    running: int
    pending: int


class BatchProgress(BaseModel):
    """A batch's state: `GET /api/v1/batches/{batch_id}` (and the answer to its submission)."""

    batch_id: str
    status: Literal["queued", "running", "completed", "cancelled"]
    model_id: str
    created_at: str | None
    started_at: str | None
    completed_at: str | None
    items: BatchItemCounts
    positions_done: int
    positions_per_second: float | None
    eta_seconds: float | None
    options: dict[str, Any]


class BatchListing(BaseModel):
    batches: list[BatchProgress]
    total: int
    limit: int
    offset: int


# -- diff -------------------------------------------------------------------------------------------------------------
class DiffSide(TextOrMessages):
    """One side of a diff: an input, the position whose activation is taken, and (optionally) its own model."""

    text: Text | None = Field(None, description="Input text (or give `messages`).")
    position: int = Field(
        -1, ge=-(2**31), le=2**31 - 1, description="Token position; negative counts from the end (-1 = last)."
    )
    model_id: ModelId | None = Field(
        None, description="This side's model (one group with the other side's, same layer and d_model)."
    )


class DiffRequest(StrictBody):
    """`POST /api/v1/diff`: the explanation of A − B, and of A and B each."""

    model_config = ConfigDict(extra="forbid")
    a: DiffSide
    b: DiffSide
    model_id: ModelId | None = Field(None, description="The model of a side that names none.")
    options: AnalyzeOptions | None = Field(
        None, description="Explanation options (best_of_k, temperature, seed, salience, return_vectors)."
    )
    encoding: Encoding = "list"

    @model_validator(mode="after")
    def _options(self) -> DiffRequest:
        o = self.options
        if o is not None and (o.last_n_messages is not None or o.use_chat_format is not None):
            raise ValueError("last_n_messages and use_chat_format do not apply to a diff")
        if o is not None and o.steer is not None:
            raise ValueError("a diff explains A − B as it is; steer does not apply")
        if o is not None and "no_kl" in o.model_fields_set and not o.no_kl:
            raise ValueError("a difference vector has no context to measure KL in; leave no_kl out")
        return self


# -- result cache and shares ----------------------------------------------------------------------------------------
MAX_SHARE_COMMENT_CHARS = 512
Span = Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(min_length=2, max_length=2)]


class JobDeleted(BaseModel):
    request_id: str
    deleted: Literal[True] = True


class ShareAnchor(StrictBody):
    """What a share points at: one analysed position, a span of token positions or a span of characters of the
    shown text (spans are half-open, [start, end), and not empty)."""

    model_config = ConfigDict(extra="forbid")
    position: int | None = Field(None, ge=0, le=2**31 - 1, description="A token position with a row.")
    tokens: Span | None = Field(None, description="[first, end) token positions.")
    chars: Span | None = Field(None, description="[first, end) characters of the rows' tokens joined.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ShareAnchor:
        given = [name for name in ("position", "tokens", "chars") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("an anchor is exactly one of position, tokens or chars")
        span = self.tokens or self.chars
        if span is not None and span[0] >= span[1]:
            raise ValueError("a span [start, end) needs start < end")
        return self

    def plain(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ShareRequest(StrictBody):
    """`POST /api/v1/shares`: a link to one completed analysis, anchored, with an optional comment."""

    model_config = ConfigDict(extra="forbid")
    request_id: Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
    anchor: ShareAnchor
    comment: Annotated[str, NoNul] | None = Field(None, max_length=MAX_SHARE_COMMENT_CHARS)


class ShareCreated(BaseModel):
    share_id: str
    url: str
