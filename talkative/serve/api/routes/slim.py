"""The slim API (`/api/slim`): chat messages in, few knobs, everything else fixed.

It stays one module rather than a route in each resource module: it is a contract of its own (its prefix, its
bodies, its fixed settings, its own status shape) that a client reads as one page, and each of its routes is a
thin translation into the resources' operations (the same queue, store, cancellation and catalogue views as the
main API). Spreading it over the resource modules would scatter that contract without removing any code.

Every POST queues a job and answers with its `request_id`; `GET /api/slim/status/{request_id}` returns its state
and a slim `result`:

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

from ...catalog import listing, visibility
from ...catalog.registry import GroupEntry
from ...jobs.record import COMPLETED, Job, UnknownRequest
from ...scheduling.types import SchedulerError
from ...service import Service
from ..deps import Catalog, GenerationsDep, Identity, ServiceDep, client_identity, refund_cache_hit
from ..schemas import (
    AnalyzeRequest,
    ErrorBody,
    GenerateOptions,
    GenerateRequest,
    SlimAccepted,
    SlimAnalyze,
    SlimGenerate,
    SlimRequest,
    SlimSendMessage,
)

router = APIRouter(
    prefix="/api/slim",
    tags=["slim"],
    dependencies=[Depends(client_identity)],
    responses={400: {"model": ErrorBody}, 403: {"model": ErrorBody}, 404: {"model": ErrorBody}},
)
#: the slim API's fixed seed: the same conversation gives the same answer
SEED = 42


def default_model(svc: Service, group: GroupEntry, who: Identity) -> str:
    """The group's model a request that names none runs on; 403 when the client may use none of them."""
    model_id = listing.default_model(svc.registry, group, who)
    if model_id is None:
        raise SchedulerError(403, f"no model of group {group.group_id} is open to this client")
    return model_id


def _model_for(svc: Service, body: SlimRequest, who: Identity) -> str:
    registry = svc.registry
    group = visibility.check_group(registry, body.model_group, who)
    if body.model_id is None:
        return default_model(svc, group, who)
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
    svc: Service,
    gens: GenerationsDep,
    body: SlimRequest,
    who: Identity,
    options: GenerateOptions,
    *,
    slim: str,
) -> dict[str, Any]:
    """The two generation routes differ only in their options; `slim` shapes the status answer later."""
    model_id = _model_for(svc, body, who)
    req = GenerateRequest(
        messages=body.messages, model_id=model_id, client_request_id=body.client_request_id, options=options
    )
    job = await gens.submit(
        req.engine_request(),
        model_id=model_id,
        owner=who.key,
        client_request_id=req.client_request_id,
        slim=slim,
    )
    return _accepted(svc, job, body.model_group)


@router.post("/generate", response_model=SlimAccepted, summary="Continue a conversation (n continuations)")
async def slim_generate(
    body: SlimGenerate, svc: ServiceDep, gens: GenerationsDep, who: Identity
) -> dict[str, Any]:
    options = GenerateOptions(
        max_new_tokens=body.n_tokens,
        temperature=body.temperature,
        num_completions=body.n_continuations,
        seed=SEED,
        steer=body.steer,
    )
    return await _submit_generation(svc, gens, body, who, options, slim="generate")


@router.post("/analyze", response_model=SlimAccepted, summary="Explain every token of a conversation")
async def slim_analyze(body: SlimAnalyze, svc: ServiceDep, who: Identity, request: Request) -> dict[str, Any]:
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
    model_id = _model_for(svc, body, who)
    req = AnalyzeRequest.model_validate(
        {
            "messages": [m.model_dump() for m in body.messages],
            "model_id": model_id,
            "options": options,
            "client_request_id": body.client_request_id,
        }
    )
    job = await svc.submit_analysis(
        req.engine_request(), model_id=req.model_id, client_request_id=req.client_request_id, owner=who.key
    )
    await refund_cache_hit(request, who, job)
    return _accepted(svc, job, body.model_group)


@router.post(
    "/send_message",
    response_model=SlimAccepted,
    summary="One assistant reply (stops at the end of its turn; a trailing assistant message is continued)",
)
async def slim_send_message(
    body: SlimSendMessage, svc: ServiceDep, gens: GenerationsDep, who: Identity
) -> dict[str, Any]:
    options = GenerateOptions(
        max_new_tokens=body.max_tokens,
        temperature=body.temperature,
        num_completions=1,
        seed=SEED,
        stop_at_end_of_turn=True,
    )
    return await _submit_generation(svc, gens, body, who, options, slim="send_message")


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
async def slim_status(request_id: str, svc: ServiceDep) -> dict[str, Any]:
    job = await svc.scheduler.get(request_id)
    if job is None:
        raise UnknownRequest(request_id)
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
async def slim_models(svc: ServiceDep, who: Identity, state: Catalog) -> dict[str, Any]:
    return listing.slim_groups(svc.registry, state, who)


@router.get("/models/{group_id}/layers", summary="The models (layers) of a group; a model id names its group")
async def slim_layers(group_id: str, svc: ServiceDep, who: Identity, state: Catalog) -> dict[str, Any]:
    registry = svc.registry
    # a group or model this client may not see answers exactly like one that does not exist (a 403 would
    # confirm that it does)
    named_group = group_id in registry.groups
    model = registry.models.get(group_id)
    gid = group_id if named_group else (model.group_id if model is not None else None)
    visible = visibility.sees_group(registry, gid, who) and (
        named_group or visibility.sees_model(registry, group_id, who)
    )
    if gid is None or not visible:
        raise HTTPException(404, f"unknown group_id or model_id {group_id!r}")
    group = visibility.check_group(registry, gid, who)
    default = default_model(svc, group, who)
    return listing.slim_layers(registry, state, group, default, who)
