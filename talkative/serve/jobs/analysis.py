"""The analysis kind: prepare the input on the device, then explain it in chunks that share engine batches.

An admitted analysis is prepared by its device's worker (tokens, activations), then its positions are dealt out
in chunks. A device runs `NUM_WORKERS_PER_GPU` engine batches at once; the scheduling policy says what each holds
(`scheduling/policy.py`: the lead job and the chunks that fill its batch), and no forward of a batch holds more
than ROW_TOKEN_BUDGET rows × tokens (the engine splits it). Here too: REQUEST_TIMEOUT, counted on a job's own
engine time (its preparation and the batches that carry its positions, not the time it waits for a worker
another job holds), progress and ETA messages, and turning the rows into the job's result.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from typing import Any, Protocol

from ...nla.flags import with_position_flags
from ...nla.options import Resolved, resolve
from ..catalog.registry import Registry
from ..scheduling.policy import SchedulingPolicy, WorkView
from ..scheduling.types import STAGE_EXPLAINING, STAGE_PREPARING, DeviceState, Work
from ..scheduling.workers import PreparedInput, WorkFailed
from ..settings import Settings
from .batches import is_batch_item
from .cache import CacheMonitor, CachePlan, input_key, options_key, row_key
from .kinds import JobControl, JobKind
from .record import COMPLETED, FAILED, Job

log = logging.getLogger("talkative.serve.jobs.analysis")

KIND = "analyze"


def effective_options(
    settings: Settings, registry: Registry, model_id: str, options: dict[str, Any] | None
) -> Resolved:
    """A request's options as they run on `model_id`: the model's no_kl setting is the default when a request
    does not say (what the result cache keys a request by, too)."""
    options = dict(options or {})
    if "no_kl" not in options and registry.model_setting(settings, "no_kl", model_id=model_id):
        options["no_kl"] = True
    return resolve(options)


class RowCache(Protocol):
    """What the analysis kind asks of a result cache: `ResultCache`, or a worker replica's stand-in that looks
    nothing up and hands each completed analysis's plan to the ingress, which keeps the rows (cluster/runner.py)."""

    monitor: CacheMonitor

    def scope(self, owner: str | None) -> str: ...
    async def rows(self, keys: list[str]) -> dict[str, dict[str, Any]]: ...
    def record(
        self, job_id: str, plan: CachePlan, rows: list[dict[str, Any]], metadata: dict[str, Any]
    ) -> None: ...


class AnalysisKind(JobKind):
    """Runs `analyze` jobs in chunks; one per app (it numbers engine batches and keeps seconds per row)."""

    names = (KIND,)

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        policy: SchedulingPolicy,
        cache: RowCache | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.policy = policy
        self.cache = cache  # None: RESULT_CACHE is off
        self._sec_per_row: dict[str, float] = {}  # model id -> EMA of engine seconds per row
        self._batch_ids = itertools.count(1)
        self._serve_seq = itertools.count(1)

    def final_message(self, job: Job) -> dict[str, Any]:
        result = job.result or {}
        return {"type": "result", "tokens": result.get("tokens", []), "metadata": result.get("metadata", {})}

    # -- admitted: prepare ----------------------------------------------------------------------------------------
    def _budget(self, model_id: str) -> int:
        return int(self.registry.model_setting(self.settings, "auto_batch_size_max", model_id=model_id))

    def start(self, job: Job, device: DeviceState, control: JobControl) -> None:
        assert job.model_id is not None
        resolved = effective_options(self.settings, self.registry, job.model_id, job.request.get("options"))
        key = (job.model_id, resolved.merge_key(), resolved.structured, resolved.return_vectors)
        work = Work(job=job, device=device, resolved=resolved, key=key, last_served=0)
        device.works[job.id] = work
        control.spawn(self._prepare(work, control))

    async def _prepare(self, work: Work, control: JobControl) -> None:
        dev, job = work.device, work.job
        assert job.model_id is not None
        dev.preparing += 1
        self._progress(work, control, STAGE_PREPARING, "Preparing the input (tokens and activations)")

        def started() -> (
            None
        ):  # on the preparation thread: the job's own time starts when it takes the job up
            work.prep_started = time.time()

        try:
            prepared = await dev.worker.prepare(
                job, work.resolved, row_budget=self._budget(job.model_id), started=started
            )
        except WorkFailed as exc:
            self._fail(work, control, str(exc))
        else:
            control.monitor.stage("extract", prepared.extract_seconds)
            hits = await self._cached_rows(work, prepared)
            if not work.cancelled and not job.terminal:
                work.handle = prepared.handle
                work.positions = list(prepared.positions)
                work.pending = [q for q in prepared.positions if q not in hits]  # only these are computed
                work.rows.update(hits)
                work.total = len(work.positions)
                work.done = len(hits)
                work.max_positions = prepared.max_positions
                work.chunk = self._chunk_size(job.model_id, work.resolved.batch_size, prepared.max_positions)
                work.num_batches = math.ceil(len(work.pending) / work.chunk)
                if not work.pending:
                    self._complete(work, control)
        finally:
            if work.prep_started is not None:
                work.engine_seconds += time.time() - work.prep_started
                work.prep_started = None
            dev.preparing -= 1
            control.schedule()

    async def _cached_rows(self, work: Work, prepared: PreparedInput) -> dict[int, dict[str, Any]]:
        """The rows of the input's positions that the result cache holds (position -> row, flagged for this
        input); the job's cache keys are kept for recording its rows when it completes."""
        if self.cache is None or prepared.identity is None:
            return {}
        job, cache = work.job, self.cache
        scope, options = cache.scope(job.owner), options_key(work.resolved)
        keys = {
            q: row_key(scope, prepared.identity, options, prefix)
            for q, prefix in zip(prepared.positions, prepared.prefixes, strict=True)
        }
        plan = CachePlan(
            input_key(scope, prepared.identity, options, job.request, work.resolved.last_n_messages),
            keys,
            prepared.flags,
        )
        found = await cache.rows(list(keys.values()))
        hits = {
            q: with_position_flags(found[k], prepared.flags.get(q, [])) for q, k in keys.items() if k in found
        }
        plan.cached = set(hits)
        work.cache = plan
        cache.monitor.cache_lookup(len(hits), len(keys))
        return hits

    def _chunk_size(self, model_id: str, asked: int | None, most: int) -> int:
        """Positions per chunk: the request's batch_size, else the model's, never more than the budgets allow."""
        size = asked or self.registry.model_setting(self.settings, "batch_size", model_id=model_id)
        return max(1, min(size or most, most))

    # -- chunks into engine batches -------------------------------------------------------------------------------
    def dispatch(self, device: DeviceState, control: JobControl) -> None:
        """Start engine batches while the device has free engine threads and jobs with positions ready."""
        while device.inflight < device.slots:
            ready = [w for w in device.works.values() if w.prepared and w.pending and not w.cancelled]
            if not ready:
                return
            batch = self.policy.fill_batch([self._view(w) for w in ready], device.fill_finishing)
            parts = [(device.works[job_id], self._take(device.works[job_id], n)) for job_id, n in batch]
            device.inflight += 1
            control.spawn(self._run_batch(device, parts, control))

    def _view(self, work: Work) -> WorkView:
        assert work.job.model_id is not None
        return WorkView(
            job_id=work.job.id,
            key=work.key,
            pending=len(work.pending),
            chunk=work.chunk,
            best_of_k=work.resolved.best_of_k,
            max_positions=work.max_positions,
            row_budget=self._budget(work.job.model_id),
            last_served=work.last_served,
            created_at=work.job.created_at,
            batch=is_batch_item(work.job),
        )

    def _take(self, work: Work, n: int) -> list[int]:
        chunk, work.pending = work.pending[:n], work.pending[n:]
        work.last_served = next(self._serve_seq)
        return chunk

    def remaining_rows(self, device: DeviceState) -> int:
        return sum((len(w.pending) + w.inflight) * w.resolved.best_of_k for w in device.works.values())

    def expire(self, device: DeviceState, control: JobControl, now: float, limit: float) -> None:
        """Fail the analyses whose own engine time passed REQUEST_TIMEOUT; their engine calls see it and stop."""
        message = f"the request took longer than REQUEST_TIMEOUT ({limit:g} s) of engine time and was stopped"
        for work in list(device.works.values()):
            if work.own_seconds(now) > limit:
                log.warning("job %s exceeded REQUEST_TIMEOUT on %s", work.job.id, device.name)
                self._fail(work, control, message)

    def drop(self, job_id: str, device: DeviceState) -> None:
        work = device.works.pop(job_id, None)
        if work is not None:
            work.cancelled = True
            work.handle = None  # a chunk in flight keeps its own reference until it returns
            work.rows.clear()

    async def _run_batch(
        self, dev: DeviceState, parts: list[tuple[Work, list[int]]], control: JobControl
    ) -> None:
        bid = next(self._batch_ids)
        lead = parts[0][0]
        assert lead.job.model_id is not None
        now = time.time()
        for work, _pos in parts:
            work.inflight += 1
            if work.first_chunk_at is None:
                work.first_chunk_at = now
            self._progress(
                work,
                control,
                STAGE_EXPLAINING,
                f"Processing batch {work.chunks_started + 1}/{work.num_batches}",
                batch_idx=work.chunks_started,
            )
            work.chunks_started += 1
        works = [w for w, _pos in parts]
        for work in works:
            if work.busy_since is None:
                work.busy_since = now

        def stopped() -> bool:
            """Asked by the engine between steps on its thread: stop once no part's job wants the rows."""
            return all(w.cancelled or w.job.terminal for w in works)

        t0 = time.perf_counter()
        try:
            result = await dev.worker.run_batch(
                lead.job.model_id, [(w.job.id, w.handle, pos) for w, pos in parts], lead.resolved, stopped
            )
        finally:
            dev.inflight -= 1
            ended = time.time()
            for work in works:
                if work.inflight == 1 and work.busy_since is not None:  # its last batch in flight ends here
                    work.engine_seconds += ended - work.busy_since
                    work.busy_since = None
        seconds = time.perf_counter() - t0
        n_rows = sum(len(pos) for _w, pos in parts) * lead.resolved.best_of_k
        self._record_batch(control, lead.job.model_id, n_rows, seconds, merged=len(parts) > 1)
        for name, value in result.timings.items():
            control.monitor.stage(name, value)
        for (work, pos), out in zip(parts, result.outs, strict=True):
            work.inflight -= 1
            if work.cancelled or work.job.terminal:
                continue
            if isinstance(out, WorkFailed):
                self._fail(work, control, str(out))
                continue
            for row in out:
                work.rows[row["position"]] = row
            work.done += len(pos)
            work.batches.append(bid)
            work.merged += len(parts) > 1
            for name, value in result.timings.items():
                work.timings[name] = work.timings.get(name, 0.0) + value
            if work.done >= work.total and not work.pending and work.inflight == 0:
                self._complete(work, control)
        control.schedule()

    def _record_batch(
        self, control: JobControl, model_id: str, rows: int, seconds: float, *, merged: bool
    ) -> None:
        stats = control.stats
        stats["engine_batches"] += 1
        stats["merged_batches"] += merged
        stats["engine_rows"] += rows
        stats["engine_seconds"] += seconds
        per_row = seconds / max(rows, 1)
        old = self._sec_per_row.get(model_id)
        self._sec_per_row[model_id] = per_row if old is None else 0.7 * old + 0.3 * per_row

    # -- progress and endings -------------------------------------------------------------------------------------
    def _eta(self, work: Work) -> float | None:
        remaining = work.total - work.done
        if work.done and work.first_chunk_at is not None:
            return round((time.time() - work.first_chunk_at) / work.done * remaining, 1)
        rate = self._sec_per_row.get(work.job.model_id or "")
        return None if rate is None else round(rate * remaining * work.resolved.best_of_k, 1)

    def _progress(
        self, work: Work, control: JobControl, stage: str, message: str, *, batch_idx: int = 0
    ) -> None:
        job = work.job
        prepared = work.prepared
        job.progress = {
            "stage": stage,
            "message": message,
            "batch_idx": batch_idx,
            "num_batches": work.num_batches if prepared else None,
            "done_positions": work.done,
            "total_positions": work.total if prepared else None,
            "eta_seconds": self._eta(work) if prepared else None,
            "device": work.device.name,
        }
        control.emit(job, {"type": "processing", **job.progress})

    def _complete(self, work: Work, control: JobControl) -> None:
        job, handle = work.job, work.handle
        assert handle is not None and job.model_id is not None
        work.device.works.pop(job.id, None)
        rows = [work.rows[p] for p in work.positions]
        seconds = time.time() - (job.started_at or job.created_at)
        meta = work.device.worker.finish(
            job.model_id, handle, work.resolved, work.chunk, work.timings, seconds, rows
        )
        meta.update(
            {
                "model_id": job.model_id,
                "group_id": job.group_id,
                "device": work.device.name,
                "queue_seconds": round((job.started_at or job.created_at) - job.created_at, 3),
                "engine_batches": work.batches,
                "merged_batches": work.merged,
                "cached": bool(rows) and work.cache is not None and len(work.cache.cached) == len(rows),
                "positions_cached": len(work.cache.cached) if work.cache is not None else 0,
            }
        )
        if self.cache is not None and work.cache is not None:
            self.cache.record(job.id, work.cache, rows, meta)  # before the result is announced
        control.stats["positions"] += len(rows)
        control.finish(job, COMPLETED, result={"tokens": rows, "metadata": meta})

    def _fail(self, work: Work, control: JobControl, error: str) -> None:
        work.cancelled = True
        work.device.works.pop(work.job.id, None)
        work.handle = None
        if not work.job.terminal:
            control.finish(work.job, FAILED, error=error)
