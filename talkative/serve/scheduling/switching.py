"""Which model group each device holds: switches, preloads into the CPU cache, and the administrator's reset.

A device holds one group at a time. `Scheduler._schedule` decides when a device switches (an idle device at once,
a busy one once it has drained); this part does the switch on a thread, keeps the previous group serving when the
new one cannot load, fails the queued jobs of a group that cannot load, and completes `switch` jobs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..catalog.residency import GroupRuntime
from ..jobs.record import COMPLETED, FAILED, PROCESSING, Job
from .base import SchedulerBase
from .types import DeviceState, SchedulerError

log = logging.getLogger("talkative.serve.scheduling.scheduler")  # the scheduler's parts log under one name


class GroupSwitching(SchedulerBase):
    """The group-switching part of `Scheduler` (a mixin on its shared state)."""

    # -- switching ------------------------------------------------------------------------------------------------
    def _start_switch(self, dev: DeviceState, gid: str, *, startup: bool = False) -> None:
        dev.loading, dev.draining_for = gid, None
        source = dev.group_id
        self.sink.broadcast(
            {
                "type": "group_switch_status",
                "status": "starting",
                "group_id": gid,
                "source_group_id": source,
                "device": dev.name,
            }
        )
        self._spawn(self._switch(dev, gid, startup))

    async def _switch(self, dev: DeviceState, gid: str, startup: bool) -> None:
        old, dev.runtime = dev.runtime, None
        t0 = time.perf_counter()

        restored: list[GroupRuntime] = []

        def work() -> GroupRuntime:
            if old is not None:
                self.residency.release(old)
            try:
                return self.residency.acquire(gid, dev.name)
            except Exception:
                if old is not None:  # the previous group goes back (from the CPU cache) and keeps serving
                    try:
                        restored.append(self.residency.acquire(old.group_id, dev.name))
                    except Exception as again:
                        log.error(
                            "bringing group %s back on %s failed too: %s", old.group_id, dev.name, again
                        )
                raise

        try:
            dev.runtime = await asyncio.to_thread(work)
        except Exception as exc:
            dev.runtime = restored[0] if restored else None
            log.error("loading group %s on %s failed: %s", gid, dev.name, exc)
            message = f"model group {gid} could not be loaded: {exc}"
            if startup:
                self.startup_error = message
            self.sink.broadcast(
                {
                    "type": "group_switch_status",
                    "status": "failed",
                    "group_id": gid,
                    "device": dev.name,
                    "error": message,
                }
            )
            for job in [j for j in self.queue if j.group_id == gid]:
                self.queue.remove(job)
                self._finish(job, FAILED, error=message)
        else:
            self.stats["group_loads"] += 1
            self.sink.broadcast(
                {
                    "type": "group_switch_status",
                    "status": "completed",
                    "group_id": gid,
                    "device": dev.name,
                    "seconds": round(time.perf_counter() - t0, 3),
                }
            )
        finally:
            dev.loading = None
            dev.last_used = time.time()
            if startup:
                self.ready = True
                self._spawn(self._preload())
            self._schedule()

    def model_info(self, model_id: str) -> dict[str, Any]:
        m = self.registry.model(model_id)
        return {
            "model_id": m.id,
            "group_id": m.group_id,
            "display_name": m.name,
            "layer": m.layer,
            "auto_batch_size_max": self.registry.model_setting(
                self.settings, "auto_batch_size_max", model_id=m.id
            ),
            "is_loaded": self.runtime_for(m.id) is not None,
            "generation_config": m.generation_config,
        }

    def _complete_switch(self, job: Job, rt: GroupRuntime) -> None:
        assert job.model_id is not None
        if job.model_id not in rt.nlas:
            self._finish(
                job, FAILED, error=rt.errors.get(job.model_id, f"model {job.model_id} is not loaded")
            )
            return
        server_wide = job.request.get("scope", "server") == "server"
        previous = self.registry.models.get(
            self.client_models.get(job.owner or "") or self.current_model or ""
        )
        if server_wide:  # the administrator's act: the default of every client that has not chosen its own
            self.current_model = job.model_id
            if job.owner is not None:
                self.client_models.pop(job.owner, None)
        elif job.owner is not None:  # this client's own choice; nobody else's requests change
            self.client_models[job.owner] = job.model_id
        switched = previous is None or previous.group_id != job.group_id
        whose = "the current model" if server_wide else "your current model (other clients keep theirs)"
        result = {
            "model_id": job.model_id,
            "group_id": job.group_id,
            "message": f"{job.model_id} is now {whose}"
            + (f" (group {job.group_id} loaded)" if switched else ""),
            "group_switched": switched,
            "model_info": self.model_info(job.model_id),
        }
        self._finish(job, COMPLETED, result=result)

    async def supersede_switches(self, owner: str | None, model_id: str) -> None:
        """A client's repeated switches coalesce: its switches still queued are cancelled (their subscribers hear
        `request_cancelled`), so each client has at most one switch waiting, the latest."""
        if owner is None:
            return
        for job in [j for j in self.queue if j.kind == "switch" and j.owner == owner]:
            await self.cancel(job.id, reason=f"superseded by a later switch to {model_id}")

    # -- preload and reset (issue 5: /api/v2/groups/{id}/preload, /reset) ---------------------------------------------
    async def _preload(self) -> None:
        """Groups whose preload_groups setting is true are loaded into the CPU cache ahead of use."""
        for gid in self.registry.groups:
            if gid == self.default_group or not self.registry.model_setting(
                self.settings, "preload_groups", group_id=gid
            ):
                continue
            if any(d.group_id == gid or d.loading == gid for d in self.devices):
                continue
            try:
                if await asyncio.to_thread(self.residency.preload, gid):
                    log.info("preloaded group %s into the CPU cache", gid)
            except Exception as exc:
                log.error("preloading group %s failed: %s", gid, exc)

    async def preload(self, group_id: str) -> str:
        """Load a group into the CPU cache ahead of use, so a switch to it is a move, not a load; where it is."""
        self.registry.group(group_id)  # UnknownGroup for the caller
        for dev in self.devices:
            if dev.group_id == group_id or dev.loading == group_id:
                return dev.name
        if group_id in self.residency.cached_groups():
            return "cpu_cache"
        if self.residency.capacity <= 0:
            raise SchedulerError(
                409, "the CPU cache is disabled (MAX_CPU_CACHED_MODELS=0): nothing can be preloaded"
            )
        task = self._preloads.get(group_id)
        if task is None:
            task = self._spawn(self._preload_group(group_id))
            self._preloads[group_id] = task
        loaded: bool = await asyncio.shield(task)
        if not loaded:
            raise SchedulerError(
                409,
                f"the CPU cache is full ({', '.join(self.residency.cached_groups())}; capacity "
                f"{self.residency.capacity}): switch to a group or raise MAX_CPU_CACHED_MODELS",
            )
        return "cpu_cache"

    async def _preload_group(self, group_id: str) -> bool:
        try:
            return await asyncio.to_thread(self.residency.preload, group_id)
        finally:
            self._preloads.pop(group_id, None)
            self._schedule()

    async def reset(self, drain_seconds: float = 30.0, stop_seconds: float = 120.0) -> dict[str, Any]:
        """Unload every group (devices and CPU cache) and load the default group again; queued jobs stay queued.

        Running work gets `drain_seconds` to finish (nothing new starts meanwhile); what still runs then is
        cancelled, and the reset waits up to `stop_seconds` for it to stop before giving up with a 503.
        """
        if self._resetting:
            raise SchedulerError(409, "a reset is already running")
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        self._resetting = True
        cancelled: list[str] = []
        try:
            deadline, forced = loop.time() + drain_seconds, False
            while any(d.busy for d in self.devices) or self._preloads:
                if loop.time() >= deadline:
                    if forced:
                        raise SchedulerError(503, "running work did not stop; the reset was abandoned")
                    forced = True
                    for job in [j for j in self.jobs.values() if j.status == PROCESSING]:
                        await self.cancel(
                            job.id, reason="cancelled: the server was reset by an administrator"
                        )
                        cancelled.append(job.id)
                    deadline = loop.time() + stop_seconds
                await asyncio.sleep(0.05)
            runtimes = [d.runtime for d in self.devices if d.runtime is not None]
            for dev in self.devices:
                dev.runtime, dev.draining_for = None, None
            unloaded = await asyncio.to_thread(self.residency.unload_all, runtimes)
            del runtimes
            loaded = None
            if self.default_group is not None:
                dev = self.devices[0]
                self._start_switch(dev, self.default_group)
                while dev.loading is not None:
                    await asyncio.sleep(0.05)
                if dev.group_id != self.default_group:
                    raise SchedulerError(
                        503, f"the default group {self.default_group} could not be loaded again"
                    )
                loaded = self.default_group
                self.current_model = self.registry.group(self.default_group).models[0].id
                self.client_models.clear()  # a reset starts every client afresh on the default
        finally:
            self._resetting = False
            self._schedule()
        return {
            "unloaded_groups": unloaded,
            "loaded_group": loaded,
            "current_model": self.current_model,
            "cancelled_requests": cancelled,
            "queued_requests": len(self.queue),
            "seconds": round(time.perf_counter() - t0, 3),
        }
