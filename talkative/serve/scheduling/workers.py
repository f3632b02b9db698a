"""Workers carry out what the scheduler decides: one per device, the only code that touches models and weights.

The scheduler decides (admit, batch, switch); a `Worker` executes: it loads a group onto its device, prepares an
analysis's input, runs engine batches and whole jobs, and unloads. What crosses between them is plain data — job
ids, requests, options, positions, rows, messages — plus an opaque *handle* on each prepared input that the
worker hands out and takes back, so a worker in another process (the next step: one per remote device) can
implement the same interface. Failures cross as `WorkFailed`, whose message is meant for the client; the worker
decides it (out of memory says so and what to try instead), since only it sees the engine's exceptions.

`LocalWorker` is today's implementation: the device's engine threads (`NUM_WORKERS_PER_GPU`) and its preparation
thread, the host's `Residency` (device ⇄ CPU cache moves), and the engine functions of `nla.analysis`, given to
it as an object so that tests can hand it a fake engine and residency instead of patching modules.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ...nla import analysis as nla_analysis
from ...nla.analysis import AnalysisError, Cancelled
from ...nla.checkpoint import NLA
from ...nla.options import Resolved
from ...nla.vectors import reads_current_token
from ..catalog.residency import GroupRuntime
from ..jobs.cache import prefix_digests
from ..jobs.record import Job

if TYPE_CHECKING:
    from ..catalog.residency import Residency
    from ..jobs.kinds import WholeJobKind

log = logging.getLogger("talkative.serve.scheduling.workers")

#: rows of one prepared input for one engine batch: (job id, the worker's handle, positions)
Part = tuple[str, object, list[int]]


@dataclass
class JobContext:
    """What a whole job's `run` (`jobs.kinds.WholeJobKind`) gets, on a device's worker thread."""

    job: Job
    nla: NLA
    runtime: GroupRuntime
    device: str
    emit: Callable[[dict[str, Any]], None]  # thread-safe: sends a message about this job to its listeners
    cancelled: Callable[[], bool]


@dataclass(frozen=True)
class Loaded:
    """The group a worker holds: which of its models loaded, and why the others did not."""

    group_id: str
    models: tuple[str, ...]
    errors: dict[str, str] = field(default_factory=dict)

    def missing(self, model_id: str) -> str | None:
        """Why `model_id` cannot run here (None when it can)."""
        if model_id in self.models:
            return None
        return self.errors.get(model_id, f"model {model_id} is not loaded")


@dataclass(frozen=True)
class PreparedInput:
    """An analysis's input made ready on the worker: the handle to pass back, and what the scheduler plans with."""

    handle: object
    positions: list[int]
    max_positions: int  # the most positions one engine batch of it may take (row and rows × tokens budgets)
    extract_seconds: float
    # what the result cache keys its rows by: the NLA's content hash (None when unknown), a digest of the token
    # ids up to each position (aligned with `positions`), and the input's position flags (flagged ones only)
    identity: str | None = None
    prefixes: list[str] = field(default_factory=list)
    flags: dict[int, list[str]] = field(default_factory=dict)


@dataclass
class BatchResult:
    """One engine batch's outcome: rows (or the failure) per part, in order, and its seconds per stage."""

    outs: list[list[dict[str, Any]] | WorkFailed]
    timings: dict[str, float]


class WorkFailed(Exception):
    """Work a worker could not do; the message is meant for the client (the job fails with it)."""


class LoadFailed(Exception):
    """A group that could not be loaded; `restored` is what the worker holds again (its previous group) or None."""

    def __init__(self, message: str, restored: Loaded | None) -> None:
        super().__init__(message)
        self.restored = restored


class Worker(Protocol):
    """What the scheduler asks of a device. The async methods may block the worker's own threads, never the event
    loop; the others answer from what the worker holds."""

    name: str
    cache_capacity: int  # groups its host's CPU cache holds (0: disabled)

    async def load(self, group_id: str) -> Loaded: ...
    async def unload(self) -> list[str]: ...
    async def clear_cache(self) -> list[str]: ...
    async def check(self, model_id: str, options: Resolved) -> None: ...
    async def prepare(
        self,
        job: Job,
        options: Resolved,
        *,
        row_budget: int,
        started: Callable[[], None],
    ) -> PreparedInput: ...
    async def run_batch(
        self,
        model_id: str,
        parts: Sequence[Part],
        options: Resolved,
        stopped: Callable[[], bool],
    ) -> BatchResult: ...
    async def run_job(
        self,
        kind: WholeJobKind,
        job: Job,
        emit: Callable[[dict[str, Any]], None],
        started: Callable[[], None],
    ) -> dict[str, Any]: ...
    def finish(
        self,
        model_id: str,
        handle: object,
        options: Resolved,
        chunk: int,
        timings: dict[str, float],
        seconds: float,
        rows: list[dict[str, Any]],
    ) -> dict[str, Any]: ...
    async def preload(self, group_id: str) -> bool: ...
    def cached_groups(self) -> list[str]: ...
    def model_facts(self, model_id: str) -> dict[str, Any] | None: ...
    def describe(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


class AnalysisEngine(Protocol):
    """The engine functions an analysis needs (`nla.analysis` itself, or a test's fake)."""

    def check_options(self, nla: Any, opts: Resolved, tuned: Any = None) -> None: ...
    def prepare(self, nla: Any, *, text: Any, messages: Any, options: Resolved, max_tokens: int) -> Any: ...
    def max_positions(self, nla: Any, opts: Resolved, row_budget: int, row_token_budget: int) -> int: ...
    def run_batch(
        self,
        nla: Any,
        parts: Any,
        opts: Resolved,
        *,
        cancelled: Any,
        tuned: Any,
        timings: Any,
        row_token_budget: int,
    ) -> list[list[dict[str, Any]]]: ...
    def metadata(
        self,
        nla: Any,
        prep: Any,
        opts: Resolved,
        batch_size: int,
        timings: dict[str, float],
        seconds: float,
        rows: Sequence[dict[str, Any]],
    ) -> dict[str, Any]: ...


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


class LocalWorker:
    """A device of this process: its threads, the host's residency and the engine."""

    def __init__(
        self,
        name: str,
        *,
        slots: int,
        residency: Residency,
        max_tokens: int,
        row_token_budget: int,
        engine: AnalysisEngine = nla_analysis,
    ) -> None:
        self.name = name
        self.residency = residency
        self.engine = engine
        self.max_tokens = max_tokens
        self.row_token_budget = row_token_budget
        self.cache_capacity = residency.capacity
        self.runtime: GroupRuntime | None = None
        self.batch_pool = ThreadPoolExecutor(slots, thread_name_prefix=f"engine-{name}")
        self.prep_pool = ThreadPoolExecutor(1, thread_name_prefix=f"prepare-{name}")

    # -- groups ---------------------------------------------------------------------------------------------------
    async def load(self, group_id: str) -> Loaded:
        """Park the group held now in the CPU cache and bring `group_id` here. When that fails, the previous group
        comes back (from the cache) and keeps serving: `LoadFailed.restored` says so."""
        old, self.runtime = self.runtime, None
        restored: list[GroupRuntime] = []

        def swap() -> GroupRuntime:
            if old is not None:
                self.residency.release(old)
            try:
                return self.residency.acquire(group_id, self.name)
            except Exception:
                if old is not None:
                    try:
                        restored.append(self.residency.acquire(old.group_id, self.name))
                    except Exception as again:
                        log.error(
                            "bringing group %s back on %s failed too: %s", old.group_id, self.name, again
                        )
                raise

        try:
            self.runtime = await asyncio.to_thread(swap)
        except Exception as exc:
            self.runtime = restored[0] if restored else None
            raise LoadFailed(str(exc), _loaded(self.runtime)) from exc
        loaded = _loaded(self.runtime)
        assert loaded is not None
        return loaded

    async def unload(self) -> list[str]:
        """Drop the group held here for good, not parking it (a reset); its id, if it held one."""
        runtimes = [self.runtime] if self.runtime is not None else []
        self.runtime = None
        return await asyncio.to_thread(self.residency.drop, runtimes)

    async def clear_cache(self) -> list[str]:
        """Drop every group parked in the host's CPU cache (a reset); their ids."""
        return await asyncio.to_thread(self.residency.clear_cache)

    async def preload(self, group_id: str) -> bool:
        """Load a group into the host's CPU cache ahead of use; False when the cache has no room for it."""
        return await asyncio.to_thread(self.residency.preload, group_id)

    def cached_groups(self) -> list[str]:
        return self.residency.cached_groups()

    def model_facts(self, model_id: str) -> dict[str, Any] | None:
        """What the API shows of a model held here (its NLA's own facts), or None when it is not held here."""
        rt = self.runtime
        if rt is None or model_id not in rt.nlas:
            return None
        nla = rt.nlas[model_id]
        return {
            "name": nla.name,
            "subject": nla.subject_source,
            "d_model": nla.d_model,
            "t_text": nla.t_text,
            "verbalizer_mode": nla.verbalizer.mode,
            "reconstructor_mode": nla.reconstructor.mode,
            "objective": nla.objective,
            "fve_variance": nla.fve_variance,
            "reads_current_token": reads_current_token(nla),
            # the language every explanation is sampled in (null: free text), so a client knows it can parse them
            "explanation_grammar": nla.verbalizer.grammar,
            "content_hash": rt.identities.get(model_id),
        }

    def describe(self) -> dict[str, Any]:
        rt = self.runtime
        return {
            "device": self.name,
            "group_id": rt.group_id if rt else None,
            "models": sorted(rt.nlas) if rt else [],
        }

    def close(self) -> None:
        self.batch_pool.shutdown(wait=False, cancel_futures=True)
        self.prep_pool.shutdown(wait=False, cancel_futures=True)

    def _nla(self, model_id: str) -> tuple[NLA, Any]:
        rt = self.runtime
        if rt is None or model_id not in rt.nlas:
            why = rt.errors.get(model_id) if rt is not None else None
            raise AnalysisError(why or f"model {model_id} is not loaded")
        return rt.nlas[model_id], rt.tuned.get(model_id)

    # -- analyses -------------------------------------------------------------------------------------------------
    async def check(self, model_id: str, options: Resolved) -> None:
        """Options the model cannot honour raise `AnalysisError`; it tokenizes prompt pieces, so on a thread."""
        nla, tuned = self._nla(model_id)
        await asyncio.get_running_loop().run_in_executor(None, self.engine.check_options, nla, options, tuned)

    async def prepare(
        self, job: Job, options: Resolved, *, row_budget: int, started: Callable[[], None]
    ) -> PreparedInput:
        """Tokens and activations of a job's input, on the preparation thread; `started` is called there first
        (the job's own time starts when the thread takes it up)."""
        assert job.model_id is not None
        model_id = job.model_id

        def run(nla: NLA, tuned: Any) -> PreparedInput:
            started()
            self.engine.check_options(nla, options, tuned)
            prepared = self.engine.prepare(
                nla,
                text=job.request.get("text"),
                messages=job.request.get("messages"),
                options=options,
                max_tokens=self.max_tokens,
            )
            most = self.engine.max_positions(nla, options, row_budget, self.row_token_budget)
            positions = list(prepared.positions)
            return PreparedInput(
                prepared,
                positions,
                most,
                prepared.extract_seconds,
                identity=self.runtime.identities.get(model_id) if self.runtime is not None else None,
                prefixes=prefix_digests(prepared.ids, positions),
                flags={q: list(f) for q, f in prepared.flags.items()},
            )

        try:
            nla, tuned = self._nla(job.model_id)
            return await asyncio.get_running_loop().run_in_executor(self.prep_pool, run, nla, tuned)
        except AnalysisError as exc:
            raise WorkFailed(str(exc)) from None
        except Exception as exc:
            log.exception("preparing %s failed", job.id)
            raise WorkFailed(engine_failure(exc, "preparing the input", self.name)) from None

    async def run_batch(
        self, model_id: str, parts: Sequence[Part], options: Resolved, stopped: Callable[[], bool]
    ) -> BatchResult:
        """One engine batch on an engine thread. A merged batch that fails is run again part by part, so a bad
        part fails only its own job; `stopped` is asked between engine steps (a cancelled batch stops early)."""
        timings: dict[str, float] = {}
        try:
            nla, tuned = self._nla(model_id)
            outs = await asyncio.get_running_loop().run_in_executor(
                self.batch_pool, self._engine_batch, nla, tuned, parts, options, timings, stopped
            )
        except Exception as exc:  # the executor itself failed (shutdown): every part fails alike
            outs = [exc] * len(parts)
        return BatchResult(
            [self._outcome(out, job_id) for out, (job_id, _h, _p) in zip(outs, parts, strict=True)], timings
        )

    def _outcome(
        self, out: list[dict[str, Any]] | BaseException, job_id: str
    ) -> list[dict[str, Any]] | WorkFailed:
        if not isinstance(out, BaseException):
            return out
        if isinstance(out, AnalysisError):
            return WorkFailed(str(out))
        log.error("engine batch failed for %s: %r", job_id, out)
        return WorkFailed(engine_failure(out, "explaining", self.name))

    def _engine_batch(
        self,
        nla: NLA,
        tuned: Any,
        parts: Sequence[Part],
        opts: Resolved,
        timings: dict[str, float],
        stopped: Callable[[], bool],
    ) -> list[list[dict[str, Any]] | BaseException]:
        inputs = [(h, pos) for _id, h, pos in parts]
        kw: dict[str, Any] = {"tuned": tuned, "timings": timings, "row_token_budget": self.row_token_budget}
        if all(h is not None for h, _pos in inputs):
            try:
                return list(self.engine.run_batch(nla, inputs, opts, cancelled=stopped, **kw))
            except Cancelled as exc:
                return [exc] * len(inputs)
            except Exception as exc:
                if len(inputs) == 1:
                    return [exc]
                log.warning(
                    "a merged engine batch failed (%s); running its %d parts one by one", exc, len(inputs)
                )
        out: list[list[dict[str, Any]] | BaseException] = []
        for h, pos in inputs:
            if h is None:
                out.append(AnalysisError("cancelled"))
                continue
            try:
                out.append(self.engine.run_batch(nla, [(h, pos)], opts, cancelled=stopped, **kw)[0])
            except Exception as exc:
                out.append(exc)
        return out

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
        """The analysis's metadata (the model's facts, the input's, the summary of its rows)."""
        nla, _tuned = self._nla(model_id)
        return self.engine.metadata(nla, handle, options, chunk, timings, seconds, rows)

    # -- whole jobs -----------------------------------------------------------------------------------------------
    async def run_job(
        self,
        kind: WholeJobKind,
        job: Job,
        emit: Callable[[dict[str, Any]], None],
        started: Callable[[], None],
    ) -> dict[str, Any]:
        """A whole job (a generation, a vector request) on an engine thread: the kind's `run`, given the model.
        `started` is called on the thread first (REQUEST_TIMEOUT counts from there, not while waiting for it)."""
        assert job.model_id is not None

        def run(ctx: JobContext) -> dict[str, Any]:
            started()
            return kind.run(ctx)

        try:
            nla, _tuned = self._nla(job.model_id)
            assert self.runtime is not None
            ctx = JobContext(
                job=job,
                nla=nla,
                runtime=self.runtime,
                device=self.name,
                emit=emit,
                cancelled=lambda: job.terminal,
            )
            return await asyncio.get_running_loop().run_in_executor(self.batch_pool, run, ctx)
        except AnalysisError as exc:
            raise WorkFailed(str(exc)) from None
        except Exception as exc:
            log.exception("%s job %s failed", job.kind, job.id)
            raise WorkFailed(engine_failure(exc, f"running the {job.kind} request", self.name)) from None


def _loaded(rt: GroupRuntime | None) -> Loaded | None:
    if rt is None:
        return None
    return Loaded(rt.group_id, tuple(rt.nlas), dict(rt.errors))
