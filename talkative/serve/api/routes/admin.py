"""The administrator's routes: `POST /reset`.

Kept apart from the resources because the rule is the caller, not the resource: only the administrator (the key
named `admin`, or the local user of a server without keys) may call them, and every other caller gets 403.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query

from ...scheduling.types import SchedulerError
from ..deps import Identity, ServiceDep, client_identity
from ..schemas import ErrorBody

#: the refusal of a reset with BACKEND=ray, and what to do instead
RAY_RESET_REFUSAL = (
    "the reset is not available with BACKEND=ray: the models are held by worker replicas, not by this server; "
    "to unload them, redeploy (stop and start `talkative serve --backend ray`) or restart the worker pool's "
    "replicas (Serve replaces each with an empty one, which loads groups as their jobs come)"
)

router = APIRouter(dependencies=[Depends(client_identity)], responses={403: {"model": ErrorBody}})


@router.post(
    "/reset",
    summary="Administrator: unload every model and load the default group again (queued jobs are kept)",
    responses={409: {"model": ErrorBody}, 503: {"model": ErrorBody}},
)
async def reset(
    svc: ServiceDep,
    who: Identity,
    drain_seconds: float = Query(30.0, ge=0, le=3600, description="How long running work may finish first."),
) -> dict[str, Any]:
    """Nothing new starts while running work finishes (for up to `drain_seconds`; what still runs then is
    cancelled); then every group is dropped from the devices and the CPU cache, and the default group is loaded
    again. Queued requests stay queued and run afterwards. Needs the administrator's key (403 otherwise)."""
    if not who.is_admin:
        raise HTTPException(403, "only the administrator may reset the server")
    if svc.settings.backend == "ray":
        # the groups are held by worker replicas that Serve places and multiplexes, none of which this ingress
        # replica can address one by one (a handle's call reaches one replica Serve picks): resetting the ingress's
        # virtual devices alone would report a reset that did not happen
        raise SchedulerError(409, RAY_RESET_REFUSAL)
    done = await svc.scheduler.reset(drain_seconds=drain_seconds)
    loaded = done["loaded_group"]
    return {
        "status": "reset",
        "message": "every model was unloaded"
        + (
            f" and the default group {loaded} was loaded again" if loaded else " (no default group to reload)"
        ),
        **done,
    }
