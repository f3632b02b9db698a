"""The operations both APIs (REST and WebSocket) offer, over the serving objects the app built.

One `Service` per app, given its parts by `app.build_serving`: settings, the model catalogue, group residency, the
job store, the scheduler and the WebSocket hub. It takes domain values — an analysis is the engine request
`{text | messages, options}` with only the options the client set — never API bodies: the routes and the
WebSocket protocol turn their bodies into these values, and domain errors (`SchedulerError`, `UnknownModel`,
`AnalysisError`) into HTTP statuses or `error` frames.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from ..nla.analysis import AnalysisError
from .catalog.registry import Registry
from .catalog.residency import Residency
from .jobs.analysis import effective_options
from .jobs.cache import ResultCache, cached_metadata, input_key, options_key
from .jobs.record import QUEUED, Job, UnknownRequest, text_length
from .jobs.store import JobStore
from .scheduling.scheduler import Scheduler
from .scheduling.types import SchedulerError
from .settings import Settings

if TYPE_CHECKING:
    from .api.ws.hub import Hub  # the WebSocket hub the service starts and stops with the scheduler

log = logging.getLogger("talkative.serve")


class Service:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        residency: Residency,
        store: JobStore,
        scheduler: Scheduler,
        hub: Hub,
        cache: ResultCache | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.residency = residency
        self.store = store
        self.scheduler = scheduler
        self.hub = hub
        self.cache = cache  # None: RESULT_CACHE is off

    async def start(self) -> None:
        await self.scheduler.start()
        self.hub.start()

    async def stop(self) -> None:
        await self.hub.stop()
        await self.scheduler.stop()
        if self.cache is not None:
            self.cache.close()
        self.store.close()

    # -- operations -----------------------------------------------------------------------------------------------
    async def submit_analysis(
        self,
        request: dict[str, Any],
        *,
        model_id: str | None,
        client_request_id: str | None,
        owner: str | None,
        subscriber: Any = None,
    ) -> Job:
        """Queue an analysis of `request` (`{text | messages, options}`, only the options the client set, so the
        model's defaults still apply) on `model_id`, else the client's current model."""
        length = text_length(request)
        if length > self.settings.max_text_length:
            raise SchedulerError(
                400,
                f"the text has {length} characters, more than MAX_TEXT_LENGTH ({self.settings.max_text_length})",
            )
        model = await self.scheduler.resolve_model(model_id, owner)
        try:
            await self.scheduler.check_analysis(model, request["options"])
        except AnalysisError as exc:
            raise SchedulerError(400, str(exc)) from None
        result = await self._cached_result(model, request, owner)
        if result is not None:
            return await self.scheduler.answered(
                "analyze",
                request,
                result,
                model_id=model,
                client_request_id=client_request_id,
                owner=owner,
                subscriber=subscriber,
            )
        return await self.scheduler.submit(
            "analyze",
            request,
            model_id=model,
            client_request_id=client_request_id,
            owner=owner,
            subscriber=subscriber,
        )

    async def _cached_result(
        self, model_id: str, request: dict[str, Any], owner: str | None
    ) -> dict[str, Any] | None:
        """The result of an identical request, when the result cache holds every row of it. Only a model on a
        device has a known identity (its content hash, taken when it was loaded); others are looked up row by
        row once prepared."""
        loaded = self.scheduler.loaded_model(model_id) if self.cache is not None else None
        identity = loaded[1].get("content_hash") if loaded is not None else None
        if self.cache is None or identity is None:
            return None
        opts = effective_options(self.settings, self.registry, model_id, request.get("options"))
        scope = self.cache.scope(owner)
        entry = await self.cache.answer(
            input_key(scope, identity, options_key(opts), request, opts.last_n_messages)
        )
        if entry is None:
            return None
        self.cache.monitor.cache_lookup(len(entry["rows"]), len(entry["rows"]))
        group = self.registry.model(model_id).group_id
        return {"tokens": entry["rows"], "metadata": cached_metadata(entry, model_id, group)}

    async def delete_job(self, job_id: str) -> None:
        """Remove a job for good: cancelled first when it has not finished, then its stored record and result,
        and the rows it added to the result cache."""
        job = await self.scheduler.get(job_id)
        if job is None:
            raise UnknownRequest(job_id)
        if not job.terminal:
            await self.scheduler.cancel(job_id, "Deleted by its owner")
            await self.scheduler.wait(job_id, timeout=5)  # its end is stored before the record is removed
        await self.store.delete(job_id)
        if self.cache is not None:
            await self.cache.forget(job_id)

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
            model_id=await self.scheduler.resolve_model(model_id),
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
    async def health(self) -> dict[str, Any]:
        sched = self.scheduler
        cuda = torch.cuda.is_available()
        return {
            "status": "healthy" if sched.startup_error is None else "degraded",
            "model_loaded": bool(sched.loaded_groups()),
            "gpu_available": cuda,
            "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
            "queue_size": sched.queue_summary()["queue_size"],
            "ready": sched.ready,
            "current_model": await sched.server_model(),
            "devices": [d.describe() for d in sched.devices],
            "error": sched.startup_error,
        }
