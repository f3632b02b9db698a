"""Analyses on a device: prepare the input, then explain it in chunks that share engine batches.

An admitted analysis is prepared on the device's preparation thread, then its positions are dealt out in chunks.
A device runs `NUM_WORKERS_PER_GPU` engine batches at once; each batch is led by the active job served least
recently and filled with chunks of compatible jobs up to the model's row budget (see the `scheduler` module for
the policy), and no forward of a batch holds more than ROW_TOKEN_BUDGET rows × tokens. Here too: REQUEST_TIMEOUT,
counted on a job's own engine time (its preparation and the batches that carry its positions, not the time it
waits for a worker another job holds) and enforced inside engine calls, progress and ETA messages, and turning
the rows into a job's result.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from ...nla.analysis import (
    AnalysisError,
    Cancelled,
    Prepared,
    check_options,
    max_positions,
    metadata,
    prepare,
    run_batch,
)
from ...nla.checkpoint import NLA
from ...nla.options import Resolved, resolve
from ..catalog.residency import GroupRuntime
from ..scheduling.base import SchedulerBase
from ..scheduling.types import STAGE_EXPLAINING, STAGE_PREPARING, DeviceState, Work
from .record import COMPLETED, FAILED, Job

log = logging.getLogger("talkative.serve.scheduling.scheduler")  # the scheduler's parts log under one name


class AnalysisJobs(SchedulerBase):
    """The analysis part of `Scheduler` (a mixin on its shared state)."""

    async def check_analysis(self, model_id: str, options: dict[str, Any]) -> None:
        """Options the model cannot honour are refused before queueing when the model is loaded (else later).

        The check tokenizes user-supplied prompt pieces (to bound them in tokens), so it runs on a worker thread,
        never on the event loop."""
        resolved = resolve(options)
        loaded = self.runtime_for(model_id)
        if loaded is not None:
            rt, nla = loaded
            await asyncio.get_running_loop().run_in_executor(
                None, check_options, nla, resolved, rt.tuned.get(model_id)
            )

    # -- analysis: prepare ----------------------------------------------------------------------------------------
    def _budget(self, model_id: str) -> int:
        return int(self.registry.model_setting(self.settings, "auto_batch_size_max", model_id=model_id))

    def _start_analysis(self, job: Job, dev: DeviceState) -> None:
        assert job.model_id is not None
        options = dict(job.request.get("options") or {})
        if "no_kl" not in options and self.registry.model_setting(
            self.settings, "no_kl", model_id=job.model_id
        ):
            options["no_kl"] = True  # the model's no_kl setting is the default when a request does not say
        resolved = resolve(options)
        key = (job.model_id, resolved.merge_key(), resolved.structured, resolved.return_vectors)
        work = Work(job=job, device=dev, resolved=resolved, key=key, last_served=0)
        dev.works[job.id] = work
        self._spawn(self._prepare(work))

    async def _prepare(self, work: Work) -> None:
        dev, job = work.device, work.job
        rt = dev.runtime
        assert rt is not None and job.model_id is not None
        dev.preparing += 1
        self._progress(work, STAGE_PREPARING, "Preparing the input (tokens and activations)")
        try:
            nla = rt.nlas.get(job.model_id)
            if nla is None:
                raise AnalysisError(rt.errors.get(job.model_id, f"model {job.model_id} is not loaded"))
            tuned = rt.tuned.get(job.model_id)
            req = job.request
            prepared, most = await asyncio.get_running_loop().run_in_executor(
                dev.prep_pool, self._prepare_sync, work, nla, req, tuned
            )
        except AnalysisError as exc:
            self._fail_work(work, str(exc))
        except Exception as exc:
            log.exception("preparing %s failed", job.id)
            self._fail_work(work, engine_failure(exc, "preparing the input", dev.name))
        else:
            extract = getattr(prepared, "extract_seconds", None)
            if extract is not None:
                self.monitor.stage("extract", extract)
            if not work.cancelled and not job.terminal:
                work.prepared = prepared
                work.pending = list(prepared.positions)
                work.total = len(work.pending)
                work.max_positions = most
                work.chunk = self._chunk_size(job.model_id, work.resolved, most)
                work.num_batches = math.ceil(work.total / work.chunk)
                if work.total == 0:
                    self._complete_work(work, nla)
        finally:
            if work.prep_started is not None:
                work.engine_seconds += time.time() - work.prep_started
                work.prep_started = None
            dev.preparing -= 1
            self._schedule()

    def _prepare_sync(self, work: Work, nla: NLA, req: dict[str, Any], tuned: Any) -> tuple[Prepared, int]:
        """The prepared input and the most positions one batch of it may take (both tokenize: a worker thread)."""
        work.prep_started = time.time()  # the job's own time starts when this thread takes it up
        opts = work.resolved
        assert work.job.model_id is not None
        check_options(nla, opts, tuned)
        prepared = prepare(
            nla,
            text=req.get("text"),
            messages=req.get("messages"),
            options=opts,
            max_tokens=self.settings.max_tokens,
        )
        most = max_positions(nla, opts, self._budget(work.job.model_id), self.settings.row_token_budget)
        return prepared, most

    def _chunk_size(self, model_id: str, opts: Resolved, most: int) -> int:
        """Positions per chunk: the request's batch_size, else the model's, never more than the budgets allow."""
        size = opts.batch_size or self.registry.model_setting(self.settings, "batch_size", model_id=model_id)
        return max(1, min(size or most, most))

    # -- analysis: chunks -----------------------------------------------------------------------------------------
    def _take(self, work: Work, n: int) -> list[int]:
        chunk, work.pending = work.pending[:n], work.pending[n:]
        work.last_served = next(self._serve_seq)
        return chunk

    def _dispatch(self, dev: DeviceState) -> None:
        rt = dev.runtime
        if rt is None or dev.loading is not None:
            return
        self._expire(dev)
        while dev.inflight < dev.slots:
            ready = [
                w for w in dev.works.values() if w.prepared is not None and w.pending and not w.cancelled
            ]
            if not ready:
                return
            order = sorted(ready, key=lambda w: (w.last_served, w.job.created_at))
            lead = order[0]
            assert lead.job.model_id is not None
            budget = self._budget(lead.job.model_id)
            k = lead.resolved.best_of_k
            # a batch that completes its lead takes on a CPU only parts that complete their jobs too
            only_whole = len(lead.pending) <= lead.chunk and not dev.fill_finishing
            parts = [(lead, self._take(lead, lead.chunk))]
            rows = len(parts[0][1]) * k
            for other in order[1:]:
                # equal keys mean equal k and prompt pieces, so the lead's rows × tokens cap holds for all parts
                room = min((budget - rows) // k, lead.max_positions - rows // k)
                if room <= 0:
                    break
                if other.key == lead.key and not (only_whole and len(other.pending) > min(other.chunk, room)):
                    part = self._take(other, min(other.chunk, room))
                    parts.append((other, part))
                    rows += len(part) * k
            dev.inflight += 1
            self._spawn(self._run_batch(dev, rt, parts))

    def _expire(self, dev: DeviceState) -> None:
        """Fail the jobs whose own engine time passed REQUEST_TIMEOUT; their engine calls see it and stop."""
        limit = self.settings.request_timeout
        if not limit:
            return
        now = time.time()
        message = f"the request took longer than REQUEST_TIMEOUT ({limit:g} s) of engine time and was stopped"
        for work in list(dev.works.values()):
            if work.own_seconds(now) > limit:
                log.warning("job %s exceeded REQUEST_TIMEOUT on %s", work.job.id, dev.name)
                self._fail_work(work, message)
        for job_id in list(dev.whole):
            job = self.jobs.get(job_id)
            began = dev.whole_started.get(job_id)  # set when a worker thread takes the job up
            if job is not None and not job.terminal and began is not None and now - began > limit:
                log.warning("job %s exceeded REQUEST_TIMEOUT on %s", job.id, dev.name)
                dev.whole.discard(job_id)  # its handler sees ctx.cancelled() and stops; the slot frees
                self._finish(job, FAILED, error=message)

    async def _watchdog(self) -> None:
        """REQUEST_TIMEOUT checked every second, not only between chunks: an engine call that never returns
        wakes nobody, yet its job must still fail on time (the thread itself cannot be killed)."""
        while True:
            await asyncio.sleep(1.0)
            if self.settings.request_timeout and not self._stopping:
                for dev in self.devices:
                    self._expire(dev)
                self._schedule()

    async def _run_batch(
        self, dev: DeviceState, rt: GroupRuntime, parts: list[tuple[Work, list[int]]]
    ) -> None:
        bid = next(self._batch_ids)
        lead = parts[0][0]
        assert lead.job.model_id is not None
        nla = rt.nlas[lead.job.model_id]
        tuned = rt.tuned.get(lead.job.model_id)
        now = time.time()
        for work, _pos in parts:
            work.inflight += 1
            if work.first_chunk_at is None:
                work.first_chunk_at = now
            self._progress(
                work,
                STAGE_EXPLAINING,
                f"Processing batch {work.chunks_started + 1}/{work.num_batches}",
                batch_idx=work.chunks_started,
            )
            work.chunks_started += 1
        inputs = [(w.prepared, pos) for w, pos in parts]
        timings: dict[str, float] = {}
        works = [w for w, _pos in parts]
        for work in works:
            if work.busy_since is None:
                work.busy_since = now

        def stopped() -> bool:
            """Asked by the engine between steps on its thread: stop once no part's job wants the rows."""
            return all(w.cancelled or w.job.terminal for w in works)

        t0 = time.perf_counter()
        try:
            outs = await asyncio.get_running_loop().run_in_executor(
                dev.batch_pool,
                _engine_batch,
                nla,
                inputs,
                lead.resolved,
                tuned,
                timings,
                self.settings.row_token_budget,
                stopped,
            )
        except Exception as exc:  # the executor itself failed (shutdown): every part fails alike
            outs = [exc] * len(parts)
        finally:
            dev.inflight -= 1
            ended = time.time()
            for work in works:
                if work.inflight == 1 and work.busy_since is not None:  # its last batch in flight ends here
                    work.engine_seconds += ended - work.busy_since
                    work.busy_since = None
        seconds = time.perf_counter() - t0
        n_rows = sum(len(pos) for _w, pos in parts) * lead.resolved.best_of_k
        self._record_batch(lead.job.model_id, n_rows, seconds, merged=len(parts) > 1)
        for name, value in timings.items():
            self.monitor.stage(name, value)
        for (work, pos), out in zip(parts, outs, strict=True):
            work.inflight -= 1
            if work.cancelled or work.job.terminal:
                continue
            if isinstance(out, BaseException):
                if isinstance(out, AnalysisError):
                    self._fail_work(work, str(out))
                else:
                    log.error("engine batch %d failed for %s: %r", bid, work.job.id, out)
                    self._fail_work(work, engine_failure(out, "explaining", dev.name))
                continue
            for row in out:
                work.rows[row["position"]] = row
            work.done += len(pos)
            work.batches.append(bid)
            work.merged += len(parts) > 1
            for name, value in timings.items():
                work.timings[name] = work.timings.get(name, 0.0) + value
            if work.done >= work.total and not work.pending and work.inflight == 0:
                self._complete_work(work, nla)
        self._schedule()

    def _record_batch(self, model_id: str, rows: int, seconds: float, *, merged: bool) -> None:
        self.stats["engine_batches"] += 1
        self.stats["merged_batches"] += merged
        self.stats["engine_rows"] += rows
        self.stats["engine_seconds"] += seconds
        per_row = seconds / max(rows, 1)
        old = self._sec_per_row.get(model_id)
        self._sec_per_row[model_id] = per_row if old is None else 0.7 * old + 0.3 * per_row

    def _eta(self, work: Work) -> float | None:
        remaining = work.total - work.done
        if work.done and work.first_chunk_at is not None:
            return round((time.time() - work.first_chunk_at) / work.done * remaining, 1)
        rate = self._sec_per_row.get(work.job.model_id or "")
        return None if rate is None else round(rate * remaining * work.resolved.best_of_k, 1)

    def _progress(self, work: Work, stage: str, message: str, *, batch_idx: int = 0) -> None:
        job = work.job
        prepared = work.prepared is not None
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
        self._emit(job, {"type": "processing", **job.progress})

    def _complete_work(self, work: Work, nla: NLA) -> None:
        job, prep = work.job, work.prepared
        assert prep is not None
        work.device.works.pop(job.id, None)
        rows = [work.rows[p] for p in prep.positions]
        seconds = time.time() - (job.started_at or job.created_at)
        meta = metadata(nla, prep, work.resolved, work.chunk, work.timings, seconds, rows)
        meta.update(
            {
                "model_id": job.model_id,
                "group_id": job.group_id,
                "device": work.device.name,
                "queue_seconds": round((job.started_at or job.created_at) - job.created_at, 3),
                "engine_batches": work.batches,
                "merged_batches": work.merged,
            }
        )
        self.stats["positions"] += len(rows)
        self._finish(job, COMPLETED, result={"tokens": rows, "metadata": meta})

    def _fail_work(self, work: Work, error: str) -> None:
        work.cancelled = True
        work.device.works.pop(work.job.id, None)
        work.prepared = None
        if not work.job.terminal:
            self._finish(work.job, FAILED, error=error)


def engine_failure(exc: BaseException, doing: str, device: str) -> str:
    """The error of a job whose engine call raised: running out of memory says so, and what to try instead."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        return (
            f"out of memory on {device} while {doing}: retry with a smaller batch_size or best_of_k, "
            "or a shorter input"
        )
    return f"internal error while {doing}: {exc}"


def _engine_batch(
    nla: NLA,
    inputs: list[tuple[Prepared | None, list[int]]],
    opts: Resolved,
    tuned: Any,
    timings: dict[str, float],
    row_token_budget: int,
    stopped: Callable[[], bool],
) -> list[list[dict[str, Any]] | BaseException]:
    """One engine batch on a worker thread; if a merged batch fails, each part is retried alone so a bad part
    fails only its own job. `stopped` is handed to the engine, which stops early (`Cancelled`) once it says so."""
    parts = [(p, pos) for p, pos in inputs if p is not None]
    kw: dict[str, Any] = {"tuned": tuned, "timings": timings, "row_token_budget": row_token_budget}
    if len(parts) == len(inputs):
        try:
            return list(run_batch(nla, parts, opts, cancelled=stopped, **kw))
        except Cancelled as exc:
            return [exc] * len(inputs)
        except Exception as exc:
            if len(inputs) == 1:
                return [exc]
            log.warning(
                "a merged engine batch failed (%s); running its %d parts one by one", exc, len(inputs)
            )
    out: list[list[dict[str, Any]] | BaseException] = []
    for p, pos in inputs:
        if p is None:
            out.append(AnalysisError("cancelled"))
            continue
        try:
            out.append(run_batch(nla, [(p, pos)], opts, cancelled=stopped, **kw)[0])
        except Exception as exc:
            out.append(exc)
    return out
