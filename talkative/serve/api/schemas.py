"""Request and response bodies of the REST and WebSocket APIs (one definition for both)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ...nla.options import MAX_MESSAGES, AnalyzeOptions, ChatMessage
from .strict import StrictBody

MAX_ID_CHARS = 200  # model and group ids: registry keys, far shorter in practice


class AnalyzeRequest(StrictBody):
    """`POST /analyze` and the WebSocket `analyze` message: text or chat messages, a model, the engine's options."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, min_length=1, description="Text to analyse (or give `messages`).")
    messages: list[ChatMessage] | None = Field(
        None,
        min_length=1,
        max_length=MAX_MESSAGES,
        description="Chat messages, oldest first; the model's chat template renders them.",
    )
    model_id: str | None = Field(
        None, max_length=MAX_ID_CHARS, description="Model to run on; default: the server's current model."
    )
    options: AnalyzeOptions | None = Field(None, description="Analysis options; absent = all defaults.")
    client_request_id: str | None = Field(
        None, max_length=200, description="Echoed in every message about this request."
    )

    @model_validator(mode="after")
    def _one_input(self) -> AnalyzeRequest:
        if (self.text is None) == (self.messages is None):
            raise ValueError("give exactly one of text or messages")
        if self.text is not None and not self.text.strip():
            raise ValueError("text is empty")
        if self.text is not None and self.options is not None and self.options.last_n_messages is not None:
            raise ValueError("options.last_n_messages applies to chat messages only; send messages, not text")
        return self

    def engine_request(self) -> dict[str, Any]:
        """What the job stores: the input and only the options the client set (so model defaults still apply)."""
        out: dict[str, Any] = {"options": self.options.model_dump(exclude_unset=True) if self.options else {}}
        if self.text is not None:
            out["text"] = self.text
        else:
            out["messages"] = [m.model_dump() for m in self.messages or []]
        return out

    def text_length(self) -> int:
        if self.text is not None:
            return len(self.text)
        return sum(len(m.content) for m in self.messages or [])


class AnalyzeAccepted(BaseModel):
    request_id: str
    status: Literal["queued"] = "queued"
    queue_position: int | None
    queue_size: int


class SwitchRequest(StrictBody):
    model_config = ConfigDict(extra="forbid")
    model_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    client_request_id: str | None = Field(None, max_length=200)


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


# -- generation (issue 5) ---------------------------------------------------------------------------------------------
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
    model_id: str | None = Field(
        None,
        max_length=MAX_ID_CHARS,
        description="The seed's place for the model (same as the top-level one).",
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


class GenerateRequest(StrictBody):
    """`POST /generate` and the WebSocket `generate` message: continue a text, or a chat (a trailing assistant
    message is continued, otherwise a new assistant turn starts)."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, min_length=1, description="Prompt to continue (or give `messages`).")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, max_length=MAX_MESSAGES, description="Chat messages, oldest first."
    )
    model_id: str | None = Field(
        None, max_length=MAX_ID_CHARS, description="Model to run on; default: the server's current model."
    )
    options: GenerateOptions | None = None
    client_request_id: str | None = Field(None, max_length=200)

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.text is None) == (self.messages is None):
            raise ValueError("give exactly one of text or messages")
        inner = self.options.model_id if self.options is not None else None
        if inner is not None and self.model_id is not None and inner != self.model_id:
            raise ValueError(f"model_id {self.model_id!r} and options.model_id {inner!r} disagree")
        if self.model_id is None and inner is not None:
            self.model_id = inner
        return self

    def text_length(self) -> int:
        if self.text is not None:
            return len(self.text)
        return sum(len(m.content) for m in self.messages or [])
