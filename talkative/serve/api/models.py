"""Request and response bodies of the REST and WebSocket APIs (one definition for both)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ...nla.options import AnalyzeOptions, ChatMessage


class AnalyzeRequest(BaseModel):
    """`POST /analyze` and the WebSocket `analyze` message: text or chat messages, a model, the engine's options."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, min_length=1, description="Text to analyse (or give `messages`).")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="Chat messages, oldest first; the model's chat template renders them."
    )
    model_id: str | None = Field(None, description="Model to run on; default: the server's current model.")
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


class SwitchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: str = Field(min_length=1)
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
