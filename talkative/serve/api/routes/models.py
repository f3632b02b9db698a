"""The model catalogue (`/api/v2/...`): the listing, switching a client's current model, preloading a group into
the CPU cache, memory and where the groups are, and one model's metadata.

The `/api/v2` paths are this resource's own (the seed API names them so), not aliases of other routes, so they live
here rather than in a version module. Every view of groups and models is built by `catalog/listing.py`, so each
shows a client exactly what the others do (hidden and backend_only entries included).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException

from ...catalog import listing, visibility
from ..deps import Catalog, Identity, ServiceDep, StatsDep, client_identity
from ..schemas import ErrorBody, SwitchRequest, SwitchResponse

router = APIRouter(
    dependencies=[Depends(client_identity)],
    responses={400: {"model": ErrorBody}, 403: {"model": ErrorBody}, 404: {"model": ErrorBody}},
)


@router.get("/api/v2/models", summary="Model groups, their models, and what is loaded")
async def list_models(svc: ServiceDep, who: Identity, state: Catalog) -> dict[str, Any]:
    return listing.client_listing(svc.registry, svc.settings, state, who)


@router.post("/api/v2/models/switch", response_model=SwitchResponse, responses={503: {"model": ErrorBody}})
async def switch_model(body: SwitchRequest, svc: ServiceDep, who: Identity) -> dict[str, Any]:
    """Make a model this client's current one (the model of its requests that name none); the administrator's
    switch sets the server's default instead, for every client that has not chosen its own. A switch to another
    group is queued behind the work running on the device and answered when the group is loaded (or after
    REQUEST_TIMEOUT with `status: "queued"`; follow it with `GET /status/{request_id}`). A switch counts against
    MAX_QUEUE_SIZE and MAX_JOBS_PER_CLIENT; a later switch of the same client replaces a queued one (409 for
    the replaced request)."""
    visibility.check_model(svc.registry, body.model_id, who)
    job = await svc.submit_switch(
        body.model_id,
        client_request_id=body.client_request_id,
        owner=who.key,
        server_default=who.is_admin,
    )
    job = await svc.scheduler.wait(job.id, timeout=svc.settings.request_timeout or None)
    if job.status == "failed":
        raise HTTPException(503, job.error or "the switch failed")
    if job.status == "cancelled":  # a later switch of this client replaced it while it waited
        raise HTTPException(409, job.error or "the switch was cancelled")
    if job.status == "completed" and job.result is not None:
        info = job.result["model_info"]
        return {
            "status": "success",
            **job.result,
            "model_info": {k: info[k] for k in ("model_id", "group_id", "is_loaded")},
            "request_id": job.id,
        }
    model = svc.registry.model(body.model_id)
    return {
        "status": "queued",
        "model_id": model.id,
        "group_id": model.group_id,
        "message": f"the switch to {model.id} is still waiting (status: {job.status})",
        "group_switched": True,
        "model_info": {"model_id": model.id, "group_id": model.group_id, "is_loaded": False},
        "request_id": job.id,
    }


@router.post(
    "/api/v2/groups/{group_id}/preload",
    summary="Load a model group into the CPU cache, so switching to it is a move instead of a load",
    responses={409: {"model": ErrorBody}},
)
async def preload_group(group_id: str, svc: ServiceDep, who: Identity) -> dict[str, Any]:
    """Every model of the group is loaded (a group always loads whole, on one copy of its base). Answers when
    the group is resident: `location` is the device serving it, or `cpu_cache`. 409 when the CPU cache is full
    or disabled (`MAX_CPU_CACHED_MODELS`)."""
    visibility.check_group(svc.registry, group_id, who)
    cached_before = group_id in svc.residency.cached_groups()
    location = await svc.scheduler.preload(group_id)
    if location == "cpu_cache":
        message = f"group {group_id} is " + (
            "already in the CPU cache" if cached_before else "loaded into the CPU cache"
        )
    else:
        message = f"group {group_id} is already loaded on {location}"
    return {"status": "success", "message": message, "group_id": group_id, "location": location}


@router.get("/api/v2/models/memory", summary="Memory of each serving device, and where the groups are")
async def memory(svc: ServiceDep, who: Identity, state: Catalog, stats: StatsDep) -> dict[str, Any]:
    """`memory` is the first device's `{allocated_gb, reserved_gb, free_gb, total_gb}` (the seed's shape),
    `devices` has every serving device. On a GPU: allocated/reserved by this process, free/total on the device;
    on a CPU: this process's resident memory (allocated = reserved: there is no caching allocator) and the
    machine's available and total RAM."""
    devices = [d.name for d in svc.scheduler.devices]
    per_device = stats.memory(devices)
    return {
        "memory": per_device[devices[0]],
        "devices": per_device,
        **listing.memory_view(svc.registry, state, who),
    }


@router.get("/api/v2/models/{model_id}/info", summary="One model's metadata")
async def model_info(model_id: str, svc: ServiceDep, who: Identity, state: Catalog) -> dict[str, Any]:
    """The seed's fields (`model_id, group_id, group_name, model_name, description, base_model, layer,
    batch_size, is_loaded, is_current`) plus its settings and, once loaded, the NLA's own facts (`nla`)."""
    svc.registry.model(model_id)  # 404 for an unknown model
    if not visibility.may_use(svc.registry, model_id, who):  # as unknown: a 403 would confirm that it exists
        raise HTTPException(404, f"unknown model_id {model_id!r}")
    loaded = svc.scheduler.loaded_model(model_id)
    nla_facts = loaded[1] if loaded is not None else None
    return listing.model_info(
        svc.registry,
        svc.settings,
        state,
        model_id,
        load_error=loaded[0].errors.get(model_id) if loaded is not None else None,
        nla=nla_facts,
    )
