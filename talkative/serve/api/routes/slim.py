"""The slim API (`/api/slim`, seed contract §5): chat messages in, few knobs, everything else fixed.

Every POST queues a job (the same queue, store and cancellation as the main API) and answers with its
`request_id`; `GET /api/slim/status/{request_id}` returns its state and a slim `result`:

* generate: `{continuations: [text], finish_reasons, prompt_tokens, completion_tokens, model_id, group_id}`;
* send_message: `{response, continuation, prefill, finish_reason, model_id, group_id}` (`response` is the whole
  assistant reply: a trailing assistant message, the prefill, is continued and included);
* analyze: the main API's `{tokens, metadata}`.

Fixed behaviour: the group's first model when `model_id` is absent, seed 42, batch size automatic, analysis with
every metric (KL included), structured explanations and batched best-of-k. An unknown group or model is 404, a
model of another group 400.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ....nla.options import MAX_MESSAGES, ChatMessage
from ...catalog import visibility
from ...catalog.registry import GroupEntry, Registry, UnknownGroup, UnknownModel
from ...errors import http_error
from ...jobs.record import COMPLETED, Job
from ...scheduling.types import SchedulerError
from ...service import Service
from ..deps import ClientIdentity, client_identity, service_of
from ..schemas import MAX_ID_CHARS, AnalyzeRequest, ErrorBody, GenerateOptions, GenerateRequest
from ..strict import StrictBody
from .generation import generations_of

router = APIRouter(
    prefix="/api/slim",
    tags=["slim"],
    dependencies=[Depends(client_identity)],
    responses={400: {"model": ErrorBody}, 403: {"model": ErrorBody}, 404: {"model": ErrorBody}},
)
SEED = 42


class SlimRequest(StrictBody):
    model_config = ConfigDict(extra="forbid")
    messages: list[ChatMessage] = Field(
        min_length=1, max_length=MAX_MESSAGES, description="The conversation so far, oldest first."
    )
    model_group: str = Field(
        min_length=1, max_length=MAX_ID_CHARS, description="A group id (GET /api/slim/models)."
    )
    model_id: str | None = Field(
        None, max_length=MAX_ID_CHARS, description="A model of that group; default: its first model."
    )
    client_request_id: str | None = Field(None, max_length=200)


def _temperature(v: float) -> float:
    if 0 < v < 0.1:
        raise ValueError("temperature must be 0 (greedy) or between 0.1 and 2.0")
    return v


class SlimGenerate(SlimRequest):
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    n_continuations: int = Field(1, ge=1, le=10, description="Independent continuations.")
    n_tokens: int = Field(100, ge=1, le=512, description="Most new tokens per continuation.")
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


# -- models ---------------------------------------------------------------------------------------------------------
def default_model(registry: Registry, group: GroupEntry, who: ClientIdentity) -> str:
    """The group's first model this client sees, else the first it may use (hidden models run when named)."""
    listed = visibility.listed_models(registry, group, who)
    usable = [m for m in group.models if visibility.may_use(registry, m.id, who)]
    if not usable:
        raise SchedulerError(403, f"no model of group {group.group_id} is open to this client")
    return (listed or usable)[0].id


def _model_for(svc: Service, body: SlimRequest, who: ClientIdentity) -> str:
    registry = svc.registry
    group = visibility.check_group(registry, body.model_group, who)
    if body.model_id is None:
        return default_model(registry, group, who)
    model = registry.model(body.model_id)
    if model.group_id != group.group_id:
        raise SchedulerError(
            400, f"model {model.id} is not in group {group.group_id} (it belongs to {model.group_id})"
        )
    visibility.check_model(registry, model.id, who)
    return model.id


def _accepted(svc: Service, job: Job, group_id: str) -> dict[str, Any]:
    return {**svc.accepted(job), "model_id": job.model_id, "model_group": group_id}


async def _submit_generation(
    request: Request, body: SlimRequest, who: ClientIdentity, options: GenerateOptions, *, slim: str
) -> dict[str, Any]:
    """The two generation routes differ only in their options; `slim` shapes the status answer later."""
    svc = service_of(request)
    try:
        model_id = _model_for(svc, body, who)
        req = GenerateRequest(
            messages=body.messages,
            model_id=model_id,
            client_request_id=body.client_request_id,
            options=options,
        )
        job = await generations_of(request).submit(req, model_id=model_id, owner=who.key, slim=slim)
    except (SchedulerError, UnknownModel, UnknownGroup) as exc:
        raise http_error(exc) from None
    return _accepted(svc, job, body.model_group)


@router.post("/generate", response_model=SlimAccepted, summary="Continue a conversation (n continuations)")
async def slim_generate(
    body: SlimGenerate, request: Request, who: ClientIdentity = Depends(client_identity)
) -> dict[str, Any]:
    options = GenerateOptions(
        max_new_tokens=body.n_tokens,
        temperature=body.temperature,
        num_completions=body.n_continuations,
        seed=SEED,
    )
    return await _submit_generation(request, body, who, options, slim="generate")


@router.post("/analyze", response_model=SlimAccepted, summary="Explain every token of a conversation")
async def slim_analyze(
    body: SlimAnalyze, request: Request, who: ClientIdentity = Depends(client_identity)
) -> dict[str, Any]:
    svc = service_of(request)
    options: dict[str, Any] = {
        "seed": SEED,
        "no_eval": False,
        "no_kl": False,
        "return_structured": True,
        "calculate_token_salience": body.calculate_token_salience,
        "optimize_explanations_config": {"best_of_k": body.best_of_k, "use_batched": True},
    }
    if body.last_n_messages is not None:
        options["last_n_messages"] = body.last_n_messages
    try:
        model_id = _model_for(svc, body, who)
        req = AnalyzeRequest.model_validate(
            {
                "messages": [m.model_dump() for m in body.messages],
                "model_id": model_id,
                "options": options,
                "client_request_id": body.client_request_id,
            }
        )
        job = await svc.submit_analysis(req, owner=who.key)
    except (SchedulerError, UnknownModel, UnknownGroup) as exc:
        raise http_error(exc) from None
    return _accepted(svc, job, body.model_group)


@router.post(
    "/send_message",
    response_model=SlimAccepted,
    summary="One assistant reply (stops at the end of its turn; a trailing assistant message is continued)",
)
async def slim_send_message(
    body: SlimSendMessage, request: Request, who: ClientIdentity = Depends(client_identity)
) -> dict[str, Any]:
    options = GenerateOptions(
        max_new_tokens=body.max_tokens,
        temperature=body.temperature,
        num_completions=1,
        seed=SEED,
        stop_at_end_of_turn=True,
    )
    return await _submit_generation(request, body, who, options, slim="send_message")


# -- status ---------------------------------------------------------------------------------------------------------
def slim_result(job: Job) -> dict[str, Any] | None:
    if job.status != COMPLETED or job.result is None:
        return None
    r = job.result
    ids = {"model_id": job.model_id, "group_id": job.group_id}
    if job.kind == "analyze":
        return {"tokens": r.get("tokens", []), "metadata": r.get("metadata", {})}
    if job.kind != "generate":
        return r
    completions = r.get("completions") or [""]
    reasons = r.get("finish_reasons") or [None]
    if job.request.get("slim") == "send_message":
        messages = job.request.get("messages") or []
        prefill = messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""
        return {
            "response": prefill + completions[0],
            "continuation": completions[0],
            "prefill": prefill,
            "finish_reason": reasons[0],
            **ids,
        }
    return {
        "continuations": completions,
        "finish_reasons": reasons,
        "prompt_tokens": r.get("prompt_tokens"),
        "completion_tokens": r.get("completion_tokens"),
        **ids,
    }


@router.get("/status/{request_id}", summary="State and slim result of a request")
async def slim_status(request_id: str, request: Request) -> dict[str, Any]:
    svc = service_of(request)
    job = await svc.scheduler.get(request_id)
    if job is None:
        raise HTTPException(404, f"unknown request_id {request_id!r}")
    return {
        "request_id": job.id,
        "status": job.status,
        "result": slim_result(job),
        "processing_time": job.processing_time,
        "error": job.error,
        "kind": job.kind,
        "model_id": job.model_id,
        "queue_position": svc.scheduler.queue_position(job.id),
        "progress": job.progress or None,
    }


# -- catalogue ------------------------------------------------------------------------------------------------------
@router.get("/models", summary="Model groups this client may use")
async def slim_models(request: Request, who: ClientIdentity = Depends(client_identity)) -> dict[str, Any]:
    svc = service_of(request)
    registry, loaded = svc.registry, svc.scheduler.loaded_groups()
    current = svc.scheduler.current_for(who.key)
    return {
        "model_groups": [
            {
                "id": g.group_id,
                "name": g.group_name,
                "description": g.description,
                "is_loaded": g.group_id in loaded,
                "default_layer": default_model(registry, g, who),
            }
            for g in visibility.listed_groups(registry, who)
        ],
        "current_model_id": current
        if current == svc.scheduler.client_models.get(who.key)
        else visibility.shown_model(registry, current, who),
    }


@router.get("/models/{group_id}/layers", summary="The models (layers) of a group; a model id names its group")
async def slim_layers(
    group_id: str, request: Request, who: ClientIdentity = Depends(client_identity)
) -> dict[str, Any]:
    svc = service_of(request)
    registry = svc.registry
    # a group or model this client may not see answers exactly like one that does not exist (a 403 would
    # confirm that it does)
    named_group = group_id in registry.groups
    gid = group_id if named_group else getattr(registry.models.get(group_id), "group_id", None)
    visible = visibility.sees_group(registry, gid, who) and (
        named_group or visibility.sees_model(registry, group_id, who)
    )
    if gid is None or not visible:
        raise HTTPException(404, f"unknown group_id or model_id {group_id!r}")
    try:
        group = visibility.check_group(registry, gid, who)
        default = default_model(registry, group, who)
    except SchedulerError as exc:
        raise http_error(exc) from None
    current = svc.scheduler.current_for(who.key)
    return {
        "group_id": group.group_id,
        "group_name": group.group_name,
        "is_loaded": group.group_id in svc.scheduler.loaded_groups(),
        "layers": [
            {
                "id": m.id,
                "name": m.name,
                "description": m.description,
                "layer": m.layer,
                "is_current": m.id == current,
            }
            for m in visibility.listed_models(registry, group, who)
        ],
        "default_layer": default,
    }
