"""The rest of the seed's model API: group preload, memory, one model's info, GPU statistics and the admin reset.

(`GET /api/v2/models` and `POST /api/v2/models/switch` live with the analysis routes in `rest.py`.)
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from ....nla.vectors import reads_current_token
from ...catalog import visibility
from ...catalog.registry import UnknownGroup, UnknownModel
from ...errors import http_error
from ...observability.system import SystemStats
from ...scheduling.types import SchedulerError
from ..deps import ClientIdentity, client_identity, service_of
from ..schemas import ErrorBody

router = APIRouter(
    dependencies=[Depends(client_identity)],
    responses={403: {"model": ErrorBody}, 404: {"model": ErrorBody}},
)


def stats_of(request: Request) -> SystemStats:
    stats: SystemStats = request.app.state.system_stats
    return stats


@router.post(
    "/api/v2/groups/{group_id}/preload",
    summary="Load a model group into the CPU cache, so switching to it is a move instead of a load",
    responses={409: {"model": ErrorBody}},
)
async def preload_group(
    group_id: str, request: Request, who: ClientIdentity = Depends(client_identity)
) -> dict[str, Any]:
    """Every model of the group is loaded (a group always loads whole, on one copy of its base). Answers when
    the group is resident: `location` is the device serving it, or `cpu_cache`. 409 when the CPU cache is full
    or disabled (`MAX_CPU_CACHED_MODELS`)."""
    svc = service_of(request)
    try:
        visibility.check_group(svc.registry, group_id, who)
        cached_before = group_id in svc.residency.cached_groups()
        location = await svc.scheduler.preload(group_id)
    except (SchedulerError, UnknownGroup) as exc:
        raise http_error(exc) from None
    if location == "cpu_cache":
        message = f"group {group_id} is " + (
            "already in the CPU cache" if cached_before else "loaded into the CPU cache"
        )
    else:
        message = f"group {group_id} is already loaded on {location}"
    return {"status": "success", "message": message, "group_id": group_id, "location": location}


@router.get("/api/v2/models/memory", summary="Memory of each serving device, and where the groups are")
async def memory(request: Request, who: ClientIdentity = Depends(client_identity)) -> dict[str, Any]:
    """`memory` is the first device's `{allocated_gb, reserved_gb, free_gb, total_gb}` (the seed's shape),
    `devices` has every serving device. On a GPU: allocated/reserved by this process, free/total on the device;
    on a CPU: this process's resident memory (allocated = reserved: there is no caching allocator) and the
    machine's available and total RAM."""
    svc = service_of(request)
    devices = [d.name for d in svc.scheduler.devices]
    per_device = stats_of(request).memory(devices)
    registry = svc.registry
    shown = {g for g in registry.groups if visibility.sees_group(registry, g, who)}
    on_device = {g: d for g, d in svc.scheduler.loaded_groups().items() if g in shown}
    cached = [g for g in svc.residency.cached_groups() if g in shown]
    models_cached = [m for m in svc.residency.cached_models() if visibility.sees_model(registry, m, who)]
    current = svc.scheduler.current_for(who.key)
    if current != svc.scheduler.client_models.get(who.key):  # the server's default: shown unless hidden
        current = visibility.shown_model(registry, current, who)
    return {
        "memory": per_device[devices[0]],
        "devices": per_device,
        "cache_info": {
            "groups_loaded": list(on_device),
            "models_cached": models_cached,
            "base_model_cache": {gid: "cpu_cache" for gid in cached} | on_device,
        },
        "current_model": current,
        "current_group": svc.registry.model(current).group_id if current else None,
    }


@router.get("/api/v2/models/{model_id}/info", summary="One model's metadata")
async def model_info(
    model_id: str, request: Request, who: ClientIdentity = Depends(client_identity)
) -> dict[str, Any]:
    """The seed's fields (`model_id, group_id, group_name, model_name, description, base_model, layer,
    batch_size, is_loaded, is_current`) plus its settings and, once loaded, the NLA's own facts (`nla`)."""
    svc = service_of(request)
    try:
        model = svc.registry.model(model_id)
    except UnknownModel as exc:
        raise http_error(exc) from None
    if not visibility.may_use(svc.registry, model_id, who):  # as unknown: a 403 would confirm that it exists
        raise HTTPException(404, f"unknown model_id {model_id!r}")
    group = svc.registry.group(model.group_id)
    loaded = svc.scheduler.runtime_for(model_id)
    settings = svc.settings
    on_device = svc.scheduler.loaded_groups()
    nla_facts = None
    if loaded is not None:
        nla = loaded[1]
        nla_facts = {
            "name": nla.name,
            "subject": nla.subject_source,
            "d_model": nla.d_model,
            "t_text": nla.t_text,
            "verbalizer_mode": nla.verbalizer.mode,
            "reconstructor_mode": nla.reconstructor.mode,
            "objective": nla.objective,
            "fve_variance": nla.fve_variance,
            "reads_current_token": reads_current_token(nla),
        }
    return {
        "model_id": model.id,
        "group_id": group.group_id,
        "group_name": group.group_name,
        "model_name": model.name,
        "description": model.description,
        "base_model": group.base_model_path,
        "layer": model.layer,
        "batch_size": svc.registry.model_setting(settings, "batch_size", model_id=model.id),
        "auto_batch_size_max": svc.registry.model_setting(settings, "auto_batch_size_max", model_id=model.id),
        "is_loaded": loaded is not None,
        "is_current": model.id == svc.scheduler.current_for(who.key),
        "location": on_device.get(group.group_id)
        or ("cpu_cache" if group.group_id in svc.residency.cached_groups() else None),
        "visible": model.visible and group.visible,
        "backend_only": visibility.backend_only(svc.registry, model.id),
        "generation_config": model.generation_config,
        "load_error": loaded[0].errors.get(model.id) if loaded is not None else None,
        "nla": nla_facts,
    }


@router.get("/api/gpu_stats", summary="GPU utilisation and memory (CPU figures when there is no GPU)")
async def gpu_stats(request: Request) -> dict[str, Any]:
    """With a GPU: the seed's `{available: true, utilization, memory_used, memory_total, memory_percent,
    peak_utilization}` (GB, percent; the first GPU) and every GPU under `devices`; utilisation needs NVML
    (`pynvml`), else it is null. Without one: `available: false`, `devices: {}`. `cpu` always holds the CPU's
    utilisation (since the previous reading), load average and RAM."""
    return stats_of(request).gpu_stats()


@router.post(
    "/reset",
    summary="Administrator: unload every model and load the default group again (queued jobs are kept)",
    responses={409: {"model": ErrorBody}, 503: {"model": ErrorBody}},
)
async def reset(
    request: Request,
    who: ClientIdentity = Depends(client_identity),
    drain_seconds: float = Query(30.0, ge=0, le=3600, description="How long running work may finish first."),
) -> dict[str, Any]:
    """Nothing new starts while running work finishes (for up to `drain_seconds`; what still runs then is
    cancelled); then every group is dropped from the devices and the CPU cache, and the default group is loaded
    again. Queued requests stay queued and run afterwards. Needs the administrator's key (403 otherwise)."""
    if not who.is_admin:
        raise HTTPException(403, "only the administrator may reset the server")
    svc = service_of(request)
    try:
        done = await svc.scheduler.reset(drain_seconds=drain_seconds)
    except SchedulerError as exc:
        raise http_error(exc) from None
    loaded = done["loaded_group"]
    return {
        "status": "reset",
        "message": "every model was unloaded"
        + (
            f" and the default group {loaded} was loaded again" if loaded else " (no default group to reload)"
        ),
        **done,
    }
