"""The server's parts wired together, and the operations both APIs (REST and WebSocket) offer.

One `Service` per app: settings, the model catalogue, group residency, the job store, the scheduler, and the
WebSocket hub that the scheduler reports to. The API modules translate requests into these calls and errors
(`SchedulerError`, `UnknownModel`, `AnalysisError`) into HTTP statuses or `error` frames.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..nla.analysis import AnalysisError
from .api.schemas import AnalyzeRequest
from .api.ws.hub import Hub
from .catalog.registry import Registry
from .catalog.residency import Residency
from .jobs.record import QUEUED, Job
from .jobs.store import JobStore
from .scheduling.scheduler import Scheduler
from .scheduling.types import SchedulerError
from .settings import Settings

log = logging.getLogger("talkative.serve")


class Service:
    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.residency = Residency(registry, settings)
        self.store = JobStore(settings.store_path())
        self.scheduler = Scheduler(settings, registry, self.residency, self.store)
        self.hub = Hub(self.scheduler, settings)
        self.scheduler.sink = self.hub

    async def start(self) -> None:
        await self.scheduler.start()
        self.hub.start()

    async def stop(self) -> None:
        await self.hub.stop()
        await self.scheduler.stop()
        self.store.close()

    # -- operations -----------------------------------------------------------------------------------------------
    async def submit_analysis(self, req: AnalyzeRequest, *, owner: str | None, subscriber: Any = None) -> Job:
        if req.text_length() > self.settings.max_text_length:
            raise SchedulerError(
                400,
                f"the text has {req.text_length()} characters, more than MAX_TEXT_LENGTH ({self.settings.max_text_length})",
            )
        model_id = self.scheduler.resolve_model(req.model_id, owner)
        request = req.engine_request()
        try:
            await self.scheduler.check_analysis(model_id, request["options"])
        except AnalysisError as exc:
            raise SchedulerError(400, str(exc)) from None
        return await self.scheduler.submit(
            "analyze",
            request,
            model_id=model_id,
            client_request_id=req.client_request_id,
            owner=owner,
            subscriber=subscriber,
        )

    async def submit_switch(
        self,
        model_id: str,
        *,
        client_request_id: str | None,
        owner: str | None,
        subscriber: Any = None,
        server_default: bool = False,
    ) -> Job:
        """Switch a client's current model (`server_default`: the server's, for every client that has not
        chosen one: the administrator's act). A queued switch of the same client is replaced by this one."""
        await self.scheduler.supersede_switches(owner, model_id)
        return await self.scheduler.submit(
            "switch",
            {"model_id": model_id, "scope": "server" if server_default else "client"},
            model_id=self.scheduler.resolve_model(model_id),
            client_request_id=client_request_id,
            owner=owner,
            subscriber=subscriber,
        )

    def accepted(self, job: Job) -> dict[str, Any]:
        """The acknowledgement of a submission: its place in the queue when it was queued (1 = next)."""
        return {
            "request_id": job.id,
            "status": QUEUED,
            "queue_position": self.scheduler.queue_position(job.id) or job.submitted_position,
            "queue_size": self.scheduler.queue_summary()["queue_size"],
        }

    # -- descriptions ---------------------------------------------------------------------------------------------
    def models_listing(self, client: str | None = None) -> dict[str, Any]:
        """`GET /api/v2/models` and the WebSocket `model_groups_list`: one builder for both; `current_model`
        and `is_current` are the client's (its own choice, else the server's default)."""
        sched = self.scheduler
        on_device = sched.loaded_groups()
        cached = self.residency.cached_groups()
        current = sched.current_for(client)
        current_group = self.registry.model(current).group_id if current else None
        groups = []
        for g in self.registry.groups.values():
            if not g.visible:
                continue
            models = []
            for m in g.models:
                if not m.visible:
                    continue
                models.append(
                    {
                        "id": m.id,
                        "name": m.name,
                        "layer": m.layer,
                        "description": m.description,
                        "batch_size": self.registry.model_setting(self.settings, "batch_size", model_id=m.id),
                        "auto_batch_size_max": self.registry.model_setting(
                            self.settings, "auto_batch_size_max", model_id=m.id
                        ),
                        "backend_only": m.backend_only,
                        "is_loaded": sched.runtime_for(m.id) is not None,
                        "is_current": m.id == current,
                    }
                )
            groups.append(
                {
                    "group_id": g.group_id,
                    "group_name": g.group_name,
                    "description": g.description,
                    "base_model": g.base_model_path,
                    "is_loaded": g.group_id in on_device,
                    "location": on_device.get(g.group_id) or ("cpu_cache" if g.group_id in cached else None),
                    "estimated_memory": g.estimated_memory,
                    "models": models,
                }
            )
        locations = {gid: "cpu_cache" for gid in cached} | on_device
        return {
            "groups": groups,
            "current_model": current,
            "current_group": current_group,
            "is_switching": sched.is_switching(),
            "model_status": {
                "model_id": current,
                "group_id": current_group,
                "is_loaded": current is not None and sched.runtime_for(current) is not None,
                "cache_info": {
                    "groups_loaded": list(on_device),
                    "models_cached": self.residency.cached_models(),
                    "base_locations": locations,
                },
            },
        }

    def health(self) -> dict[str, Any]:
        sched = self.scheduler
        cuda = torch.cuda.is_available()
        return {
            "status": "healthy" if sched.startup_error is None else "degraded",
            "model_loaded": bool(sched.loaded_groups()),
            "gpu_available": cuda,
            "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
            "queue_size": sched.queue_summary()["queue_size"],
            "ready": sched.ready,
            "current_model": sched.current_model,
            "devices": [d.describe() for d in sched.devices],
            "error": sched.startup_error,
        }
