"""What kinds of jobs the scheduler runs, behind one interface: `JobKind`.

A kind says how an admitted job of it runs on a device and what its last WebSocket message is. The app gives the
scheduler its kinds when it builds it (analysis, generation, the vector kinds); the scheduler never learns of a
kind later. Most kinds run *whole* (`WholeJobKind`): one call of `run` on a worker thread does the job (a
generation streams its tokens through `ctx.emit` meanwhile), carried out through the device's worker. The
analysis kind implements the hooks itself: it prepares on the device, then shares engine batches between jobs
(`jobs/analysis.py`).

A `switch` is not a kind: it changes which model a client runs on, state only the scheduler keeps, and it needs
no device work of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from ..scheduling.workers import JobContext, WorkFailed
from .record import CANCELLED, COMPLETED, FAILED, Job

if TYPE_CHECKING:
    from ..scheduling.types import DeviceState, Monitor

__all__ = ["SWITCH", "JobContext", "JobControl", "JobKind", "WholeJobKind", "final_message"]

SWITCH = "switch"  # the scheduler's own kind of job: it changes which model a client runs on

log = logging.getLogger("talkative.serve.jobs.kinds")


class JobControl(Protocol):
    """What a kind may ask of the scheduler that runs it (the scheduler itself, passed to every hook)."""

    stats: dict[str, float]
    monitor: Monitor

    @property
    def jobs(self) -> dict[str, Job]: ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]: ...
    def schedule(self) -> None: ...
    def emit(self, job: Job, message: dict[str, Any]) -> None: ...
    def emit_live(self, job: Job, message: dict[str, Any]) -> None: ...
    def finish(
        self, job: Job, status: str, *, result: dict[str, Any] | None = None, error: str | None = None
    ) -> None: ...


class JobKind(ABC):
    """A kind of job: the hooks the scheduler calls for the jobs of its `names`."""

    #: the `kind` values of the jobs this object runs
    names: tuple[str, ...] = ()

    def final_message(self, job: Job) -> dict[str, Any]:
        """The WebSocket message of a completed job (also what `subscribe` replays for a finished one)."""
        return {"type": f"{job.kind}_complete", "result": job.result or {}}

    async def accepted(self, job: Job) -> None:
        """Awaited by `Scheduler.submit` for a job admitted at once, before the client is answered: a kind whose
        work runs elsewhere raises `SchedulerError` when that elsewhere refused it (a full cluster: 429/503).
        Local kinds accept at once."""
        return None

    @abstractmethod
    def start(self, job: Job, device: DeviceState, control: JobControl) -> None:
        """The job was admitted to `device`: begin it (it holds one of the device's job places until it ends)."""

    @abstractmethod
    def dispatch(self, device: DeviceState, control: JobControl) -> None:
        """Start what can run on the device now."""

    @abstractmethod
    def expire(self, device: DeviceState, control: JobControl, now: float, limit: float) -> None:
        """Fail this kind's jobs on the device whose own time passed REQUEST_TIMEOUT (`limit` seconds)."""

    @abstractmethod
    def drop(self, job_id: str, device: DeviceState) -> None:
        """A job of this kind on the device was cancelled: forget what it holds."""

    @abstractmethod
    def remaining_rows(self, device: DeviceState) -> int:
        """Engine rows this kind still has to run on the device (which busy device drains first)."""


class WholeJobKind(JobKind):
    """A kind whose jobs run whole: subclasses name their kinds and define `run`."""

    @abstractmethod
    def run(self, ctx: JobContext) -> dict[str, Any]:
        """Do the whole job on a worker thread and return its result (blocking; asks `ctx.cancelled()`)."""

    def start(self, job: Job, device: DeviceState, control: JobControl) -> None:
        device.whole.add(job.id)
        control.spawn(self._run_whole(job, device, control))

    def dispatch(self, device: DeviceState, control: JobControl) -> None:
        """A whole job started in `start`: nothing more to do."""

    def expire(self, device: DeviceState, control: JobControl, now: float, limit: float) -> None:
        """A whole job's `run` sees `ctx.cancelled()` and stops, and its place on the device frees at once."""
        message = f"the request took longer than REQUEST_TIMEOUT ({limit:g} s) of engine time and was stopped"
        for job_id in list(device.whole):
            job = control.jobs.get(job_id)
            began = device.whole_started.get(job_id)  # set when a worker thread takes the job up
            if job is None or job.kind not in self.names or job.terminal or began is None:
                continue
            if now - began > limit:
                log.warning("job %s exceeded REQUEST_TIMEOUT on %s", job.id, device.name)
                device.whole.discard(job_id)
                control.finish(job, FAILED, error=message)

    def drop(self, job_id: str, device: DeviceState) -> None:
        """A whole job's `run` stops by itself at its next `ctx.cancelled()`."""

    def remaining_rows(self, device: DeviceState) -> int:
        return 0

    async def _run_whole(self, job: Job, dev: DeviceState, control: JobControl) -> None:
        loop = asyncio.get_running_loop()
        dev.inflight += 1

        def emit(message: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(control.emit_live, job, message)

        def started() -> None:  # REQUEST_TIMEOUT counts from here: waiting for a held worker is not the job's
            dev.whole_started[job.id] = time.time()

        try:
            result = await dev.worker.run_job(self, job, emit, started)
        except WorkFailed as exc:
            if not job.terminal:
                control.finish(job, FAILED, error=str(exc))
        else:
            if not job.terminal:
                control.finish(job, COMPLETED, result=result)
        finally:
            dev.inflight -= 1
            dev.whole.discard(job.id)
            dev.whole_started.pop(job.id, None)
            control.schedule()


def final_message(job: Job, kinds: Mapping[str, JobKind]) -> dict[str, Any]:
    """The terminal WebSocket message of a job (also what `subscribe` replays for a finished job): the same for
    every kind when it failed or was cancelled, the kind's own when it completed."""
    if job.status == CANCELLED:
        return {"type": "request_cancelled", "message": job.error or "Cancelled"}
    if job.status == FAILED:
        return {"type": "error", "error": job.error or "failed"}
    if job.kind == SWITCH:
        return {"type": "model_switch_complete", **(job.result or {})}
    kind = kinds.get(job.kind)
    if kind is not None:
        return kind.final_message(job)
    return {"type": f"{job.kind}_complete", "result": job.result or {}}
