"""The ingress side of the worker seam with BACKEND=ray: every job runs whole on a worker replica.

The scheduler's fine-grained worker calls (prepare an input, run an engine batch of parts of several jobs) need
the same process to keep the prepared inputs between calls, and Serve routes each call to whichever replica it
picks; so across Serve the unit of work is the whole job. The replica runs it with today's engine (its own
scheduler: preparation, shared engine batches, interleaving and merging, `runner.py`), and the ingress keeps what
it keeps today: admission, per-client caps, the job's record, listeners.

* `RemoteKind` is the ingress's one job kind for every kind name (analyses included): it hands an admitted job to
  its device's worker whole, awaits Serve's acceptance (the scheduler asks, so that a full cluster is refused to
  the client with 429/503 and Retry-After instead of being acknowledged), cancels the replica's work when the job
  is cancelled. Its end is written by the scheduler, once (with several ingress replicas, only while this one
  holds the job's lease).
* `ServeWorker` is the `Worker` of one *virtual device* (one per model group: Serve does the placement, so the
  ingress never drains or switches for real); its `run_job` is `Dispatcher.run`.
* `Dispatcher` sends a job through a `Transport` (Serve's handles in `transport.py`, a fake in unit tests), relays
  the replica's messages, and when the replica dies mid-job (its process killed, its node gone) sends the job
  again: Serve routes it to a live replica. Messages already relayed are not relayed twice: a generation's tokens
  are told apart by (completion, position), progress never goes backwards, and the result comes whole in the
  last message, so a job ends once, with one whole result. A completed analysis's end message carries its cache
  plan (its row keys, computed on the replica from the tokens it prepared, scoped by the client's cache scope the
  ingress sent), and the dispatcher records its rows in the result cache under the ingress's job id, so an
  identical request is answered from the cache at submission and deleting the job removes its rows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ...nla.analysis import AnalysisError
from ...nla.options import Resolved
from ..catalog.registry import Registry
from ..jobs.cache import CachePlan, ResultCache
from ..jobs.kinds import JobControl, JobKind, WholeJobKind
from ..jobs.record import COMPLETED, FAILED, Job
from ..scheduling.types import SchedulerError
from ..scheduling.workers import (
    BatchResult,
    JobContext,
    Loaded,
    LoadFailed,
    Part,
    PreparedInput,
    WorkFailed,
)

if TYPE_CHECKING:
    from ..scheduling.types import DeviceState

log = logging.getLogger("talkative.serve.cluster.dispatch")

#: how long the ingress waits for Serve to place a job before acknowledging it as queued in Serve's router (Serve
#: refuses a full queue at once; a job it queues is accepted and waits there)
ACCEPT_WAIT = 1.0
#: a job whose replica died is sent again this many times (each to a replica Serve picks) before it fails
MAX_REDISPATCH = 8
REDISPATCH_BACKOFF = 0.5
#: fields of a relayed progress message that are not the job's progress (the ingress sets its own ids)
RELAY_ONLY = frozenset({"type", "request_id", "client_request_id"})
#: how long the ingress waits for a replica to load a group it starts serving before it serves it anyway
LOAD_WAIT = 120.0
#: how long a submission waits for a replica to check its options: a pool whose replicas are all busy queues the
#: check like any call, and a submission must not wait for running jobs to end (the job's preparation checks then)
CHECK_WAIT = 1.0


# -- the transport: how a job reaches a replica -------------------------------------------------------------------
class ReplicaLost(Exception):
    """The replica running the call died or became unreachable: the call may be sent again."""


class ClusterBusy(Exception):
    """Serve refused the call: the pool's replicas are at max_ongoing_requests and its queue is full."""

    def __init__(self, message: str, *, status: int, retry_after: float | None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class CallCancelled(Exception):
    """The call ended because the ingress cancelled it (its job was cancelled)."""


class Stream(Protocol):
    """One call's messages; `cancel` ends the call on the replica too."""

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]: ...
    def cancel(self) -> None: ...


class Transport(Protocol):
    """Opens calls to the worker replica that holds (or will hold) a group."""

    def open(self, group_id: str, payload: dict[str, Any]) -> Stream: ...
    async def load(self, group_id: str) -> dict[str, Any]: ...
    async def check(self, group_id: str, model_id: str, options: Resolved) -> str | None:
        """The engine's option check on a replica holding the group: the refusal's reason, or None."""
        ...


# -- one job's dispatch ----------------------------------------------------------------------------------------------
@dataclass
class Dispatch:
    """A job on its way: its acceptance, its stream now, what was relayed already."""

    job: Job
    accepted: asyncio.Future[None]
    stream: Stream | None = None
    cancelled: bool = False
    answering: bool = False  # the submitting request awaits the acceptance now (a refusal is its answer)
    tokens: dict[object, int] = field(default_factory=dict)  # completion -> highest token position relayed
    done_positions: int = -1  # most done positions relayed in a progress message
    replicas: list[str] = field(default_factory=list)
    plan: CachePlan | None = None  # a completed analysis's cache plan, from its end message


class Dispatcher:
    """Sends whole jobs to worker replicas, relays their messages, re-sends a job whose replica died."""

    def __init__(
        self,
        transport: Transport,
        *,
        accept_wait: float = ACCEPT_WAIT,
        backoff: float = REDISPATCH_BACKOFF,
        cache: ResultCache | None = None,
    ) -> None:
        self.transport = transport
        self.cache = cache  # the ingress's result cache (None: RESULT_CACHE is off)
        self.backoff = backoff
        self.accept_wait = accept_wait
        self.live: dict[str, Dispatch] = {}

    def begin(self, job: Job) -> None:
        """Register a job about to be sent, so that its acceptance can be awaited from the start."""
        self.live[job.id] = Dispatch(job, asyncio.get_running_loop().create_future())

    async def accepted(self, job_id: str) -> None:
        """Return once Serve took the job (or queued it); raise `SchedulerError` (429/503 with Retry-After) when
        it refused it."""
        entry = self.live.get(job_id)
        if entry is None:
            return
        entry.answering = True
        try:
            await asyncio.wait_for(asyncio.shield(entry.accepted), self.accept_wait)
        except TimeoutError:
            pass  # queued in Serve's router: accepted, it waits there
        finally:
            entry.answering = False
            if not entry.accepted.done():
                entry.accepted.set_result(None)

    def cancel(self, job_id: str) -> None:
        """The job was cancelled at the ingress: end the replica's call (the replica cancels its job)."""
        entry = self.live.get(job_id)
        if entry is not None:
            entry.cancelled = True
            if entry.stream is not None:
                entry.stream.cancel()

    async def run(self, job: Job, emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Run the job on a replica and return its result; `WorkFailed` with the reason when it failed there."""
        assert job.group_id is not None and job.model_id is not None
        entry = self.live.get(job.id)
        if entry is None:
            self.begin(job)
            entry = self.live[job.id]
        payload = {
            "kind": job.kind,
            "request": job.request,
            "model_id": job.model_id,
            "job_id": job.id,
            "cache_scope": self.cache.scope(job.owner) if self.cache is not None else None,
        }
        try:
            for attempt in range(MAX_REDISPATCH + 1):
                if entry.cancelled:
                    raise WorkFailed("cancelled")
                try:
                    result = await self._attempt(entry, payload, emit)
                    self._record(entry, result)
                    return result
                except WorkFailed:
                    raise
                except ReplicaLost as exc:
                    if entry.cancelled:
                        raise WorkFailed("cancelled") from None
                    log.warning(
                        "job %s lost its replica %s (%s); sending it again (attempt %d)",
                        job.id,
                        entry.replicas[-1] if entry.replicas else "(not reached yet)",
                        exc,
                        attempt + 2,
                    )
                    await asyncio.sleep(self.backoff * (attempt + 1))
                except ClusterBusy as exc:
                    if entry.answering and not entry.accepted.done():
                        entry.accepted.set_exception(
                            SchedulerError(
                                exc.status,
                                f"every worker replica for group {job.group_id} is busy and its queue is full; "
                                "retry shortly",
                                reason="cluster_busy",
                                retry_after=max(1, round(exc.retry_after or 1)),
                            )
                        )
                        raise WorkFailed(f"refused by the cluster: {exc}") from None
                    # accepted earlier (acknowledged, adopted, or refused on a re-dispatch): it keeps its place
                    # and waits for room
                    await asyncio.sleep(exc.retry_after or self.backoff)
                except Exception as exc:  # the call was cancelled, or the replica's code raised
                    if entry.cancelled:
                        raise WorkFailed("cancelled") from None
                    log.exception("job %s failed on its worker replica", job.id)
                    raise WorkFailed(f"the worker replica failed: {exc}") from None
            raise WorkFailed(
                f"the worker replicas running this request died {MAX_REDISPATCH + 1} times; giving up"
            )
        finally:
            if not entry.accepted.done():
                entry.accepted.set_result(None)
            self.live.pop(job.id, None)

    async def _attempt(
        self, entry: Dispatch, payload: dict[str, Any], emit: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any]:
        stream = self.transport.open(entry.job.group_id or "", payload)
        entry.stream = stream
        if entry.cancelled:
            stream.cancel()
        try:
            async for message in stream:
                kind = message.get("type")
                if kind == "accepted":
                    entry.replicas.append(str(message.get("replica")))
                    if not entry.accepted.done():
                        entry.accepted.set_result(None)
                    continue
                if kind == "end":
                    if message.get("status") == COMPLETED:
                        entry.plan = message.get("cache_plan")
                        return dict(message.get("result") or {})
                    raise WorkFailed(str(message.get("error") or "failed on the worker replica"))
                if self._fresh(entry, message):
                    emit(message)
        except (
            asyncio.CancelledError
        ):  # the ingress stops (its scheduler's tasks end): so does the replica's job
            stream.cancel()
            raise
        raise ReplicaLost("the replica's stream ended without the job's end")

    def _record(self, entry: Dispatch, result: dict[str, Any]) -> None:
        """Keep a completed analysis's rows in the result cache under this ingress's job id (queued before the
        result is announced, so a request sent after it finds them)."""
        if self.cache is None or entry.plan is None or entry.job.terminal:
            return
        self.cache.record(entry.job.id, entry.plan, result.get("tokens") or [], result.get("metadata") or {})

    @staticmethod
    def _fresh(entry: Dispatch, message: dict[str, Any]) -> bool:
        """Whether listeners have not heard this message yet: a re-sent job repeats its tokens and progress."""
        if message.get("type") == "token" and isinstance(message.get("position"), int):
            completion = message.get("completion")
            if message["position"] <= entry.tokens.get(completion, -1):
                return False
            entry.tokens[completion] = message["position"]
        done = message.get("done_positions")
        if message.get("type") == "processing" and isinstance(done, int):
            if done < entry.done_positions:
                return False
            entry.done_positions = done
        return True


# -- the seam: a kind for every job, a worker per virtual device ---------------------------------------------------
class ServeWorker:
    """One virtual device of the ingress: it "holds" a group by making sure a replica can serve it, and runs
    each job of it whole on a replica through the dispatcher. It holds no weights, so it has no CPU cache."""

    cache_capacity = 0

    def __init__(self, name: str, registry: Registry, dispatcher: Dispatcher) -> None:
        self.name = name
        self.registry = registry
        self.dispatcher = dispatcher
        self.group_id: str | None = None
        #: the NLA facts of the group's models, as the replica that loaded it reported them (none when it only
        #: parked the group in its CPU cache)
        self.facts: dict[str, dict[str, Any]] = {}

    async def load(self, group_id: str) -> Loaded:
        """Ask a replica of the group's pool to hold it (Serve's multiplexing places it), and report its models.
        A replica that cannot be asked now (its pool busy, or slower than LOAD_WAIT) is no failure: the group's
        first job makes a replica load it. Only a group none of whose models loaded fails."""
        group = self.registry.group(group_id)
        try:
            facts = await asyncio.wait_for(self.dispatcher.transport.load(group_id), LOAD_WAIT)
        except Exception as exc:
            log.warning("group %s not loaded ahead of its jobs (%r); its first job loads it", group_id, exc)
            facts = {}
        errors = {str(k): str(v) for k, v in dict(facts.get("errors") or {}).items()}
        models = tuple(m.id for m in group.models if m.id not in errors)
        if not models or "*" in errors:
            raise LoadFailed("; ".join(errors.values()) or f"no model of group {group_id} loaded", None)
        self.group_id = group_id
        self.facts = {str(k): dict(v) for k, v in dict(facts.get("facts") or {}).items() if v}
        return Loaded(group_id, models, errors)

    async def unload(self) -> list[str]:
        held, self.group_id, self.facts = self.group_id, None, {}
        return [held] if held else []

    async def clear_cache(self) -> list[str]:
        return []

    async def check(self, model_id: str, options: Resolved) -> None:
        """The engine's option check (it tokenizes prompt pieces, so it needs the model) on a replica holding the
        group, through the same handle as the group's jobs: a refusal raises `AnalysisError`, the submitter's
        400, as with the local backend. A replica that does not answer within CHECK_WAIT (its pool full, so Serve
        queues the call) or fails leaves the check to the replica that prepares the job (a bad option then fails
        the job with the reason)."""
        group_id = self.registry.model(model_id).group_id
        try:
            refusal = await asyncio.wait_for(
                self.dispatcher.transport.check(group_id, model_id, options), CHECK_WAIT
            )
        except Exception as exc:
            log.info(
                "options of a %s job not checked before queueing (%r): its replica checks them", model_id, exc
            )
            return
        if refusal is not None:
            raise AnalysisError(refusal)

    async def prepare(
        self, job: Job, options: Resolved, *, row_budget: int, started: Callable[[], None]
    ) -> PreparedInput:
        raise WorkFailed("analyses run whole on a worker replica")

    async def run_batch(
        self, model_id: str, parts: Sequence[Part], options: Resolved, stopped: Callable[[], bool]
    ) -> BatchResult:
        return BatchResult([WorkFailed("analyses run whole on a worker replica") for _p in parts], {})

    async def run_job(
        self,
        kind: WholeJobKind,
        job: Job,
        emit: Callable[[dict[str, Any]], None],
        started: Callable[[], None],
    ) -> dict[str, Any]:
        """The whole job on a replica (the kind's own code runs there, chosen by the job's kind name)."""
        started()
        return await self.dispatcher.run(job, emit)

    def finish(
        self,
        model_id: str,
        handle: object,
        options: Resolved,
        chunk: int,
        timings: dict[str, float],
        seconds: float,
        rows: list[dict[str, Any]],
    ) -> dict[str, Any]:
        raise WorkFailed("analyses run whole on a worker replica")

    async def preload(self, group_id: str) -> bool:
        return False

    def cached_groups(self) -> list[str]:
        return []

    def model_facts(self, model_id: str) -> dict[str, Any] | None:
        return self.facts.get(model_id)

    def describe(self) -> dict[str, Any]:
        group = self.registry.groups.get(self.group_id or "")
        return {
            "device": self.name,
            "group_id": self.group_id,
            "models": sorted(m.id for m in group.models) if group else [],
        }

    def close(self) -> None:
        """Nothing runs here: the replicas' calls end with their jobs."""


class RemoteKind(WholeJobKind):
    """Every kind of job, run whole on a worker replica (see the module); final messages are the local kinds'.

    Its `run` is never called at the ingress: `ServeWorker.run_job` sends the job to a replica, where the kind of
    the job's name runs it (the replica's own analysis kind for an analysis)."""

    def __init__(self, kinds: Mapping[str, JobKind], dispatcher: Dispatcher) -> None:
        self.finals = dict(kinds)
        self.names = tuple(self.finals)
        self.dispatcher = dispatcher

    def final_message(self, job: Job) -> dict[str, Any]:
        return self.finals[job.kind].final_message(job)

    def run(self, ctx: JobContext) -> dict[str, Any]:
        raise WorkFailed(f"{ctx.job.kind} jobs run on a worker replica, not at the ingress")

    def start(self, job: Job, device: DeviceState, control: JobControl) -> None:
        device.whole.add(job.id)
        self.dispatcher.begin(job)
        control.spawn(self._run(job, device, control))

    async def accepted(self, job: Job) -> None:
        await self.dispatcher.accepted(job.id)

    def dispatch(self, device: DeviceState, control: JobControl) -> None:
        """Started in `start`: nothing more to do."""

    def expire(self, device: DeviceState, control: JobControl, now: float, limit: float) -> None:
        """The replica holds REQUEST_TIMEOUT against the job's own engine time and fails the job itself."""

    def drop(self, job_id: str, device: DeviceState) -> None:
        self.dispatcher.cancel(job_id)

    def remaining_rows(self, device: DeviceState) -> int:
        return 0

    @staticmethod
    def _relay(job: Job, message: dict[str, Any], control: JobControl) -> None:
        """A replica's message to the job's listeners; its progress is the job's here too (`/status` reads it)."""
        if message.get("type") == "processing" and not job.terminal:
            job.progress = {k: v for k, v in message.items() if k not in RELAY_ONLY}
        control.emit_live(job, message)

    async def _run(self, job: Job, dev: DeviceState, control: JobControl) -> None:
        dev.inflight += 1
        try:
            result = await dev.worker.run_job(self, job, lambda m: self._relay(job, m, control), lambda: None)
        except WorkFailed as exc:
            if not job.terminal:
                control.finish(job, FAILED, error=str(exc))
        else:
            if not job.terminal:  # else cancelled (or taken over) meanwhile: its end is written already
                control.finish(job, COMPLETED, result=result)
        finally:
            dev.inflight -= 1
            dev.whole.discard(job.id)
            control.schedule()
