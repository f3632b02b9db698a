"""Generation jobs: the `generate` kind, its token logs, and the front that submits, streams and chains them.

A generation is a job like any other (same queue, group routing, store, cancellation): `Generations.submit`
queues it, `GenerateKind.run` samples on a device worker through the engine's `generation.stream` and publishes
one `token` message per token and completion, and the job completes with the full texts (`generation_complete` on
the WebSocket). Cancellation is checked before every token, so a cancelled stream stops at the next one.

Every running generation keeps the messages it published (a `TokenLog`, filled by `TokenLogs` as the messages pass
on their way to the WebSocket hub), so a Server-Sent-Events stream opened after some tokens were produced still
delivers them all; a finished generation's tokens are also in its result (`token_texts`, `token_ids`), from which
a stream of an old job is replayed. Logs of finished jobs are kept for `LOG_RETENTION_SECONDS` (a cancelled job's
tokens live only there).

A chain (`generate_and_analyze`) waits for its generation however long it takes, then queues the analysis of the
prompt plus the completion; cancelling the generation (or the chain's `client_request_id` before the analysis is
queued) ends the chain, and the analysis is a job of its own, cancellable like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ...nla.analysis import AnalysisError
from ...nla.generation import GenerationError, GenerationRequest, GenerationResult, ResidualSteer, stream
from ...nla.options import GenerationSteerOption
from ...nla.steering import SteerError, resolve_direction
from ..catalog.registry import Registry
from ..scheduling.types import EventSink, SchedulerError
from ..scheduling.workers import JobContext
from ..settings import Settings
from .kinds import WholeJobKind
from .record import CANCELLED, COMPLETED, QUEUED, Job, UnknownRequest, text_length

if TYPE_CHECKING:
    from ..scheduling.scheduler import Scheduler

log = logging.getLogger("talkative.serve.jobs.generation")

KIND = "generate"
LOG_RETENTION_SECONDS = 600.0
DEFAULT_TOP_P = 0.95
DEFAULT_SEED = 42
#: the messages a generation's `run` publishes, which its token log keeps
LOGGED = frozenset({"processing", "token"})


class SubmitAnalysis(Protocol):
    """Queues an analysis (`Service.submit_analysis`): what a chain does once its generation completed."""

    def __call__(
        self,
        request: dict[str, Any],
        *,
        model_id: str | None,
        client_request_id: str | None,
        owner: str | None,
        subscriber: Any = None,
    ) -> Awaitable[Job]: ...


class TokenLog:
    """The messages a running generation published, in order, and a way to wait for the next one."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.done = False
        self._changed = asyncio.Event()

    def add(self, message: dict[str, Any]) -> None:
        self.events.append(message)
        self._notify()

    def finish(self) -> None:
        self.done = True
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, timeout: float) -> bool:
        """Wait for the next message (or the end); False when `timeout` passed first."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True


class TokenLogs:
    """The token logs of generations, kept as their messages pass to the next event sink (the hub).

    An event sink itself: a generation's `processing` and `token` messages go into its log (and its progress),
    and its final message closes the log, which is dropped `LOG_RETENTION_SECONDS` later.
    """

    def __init__(self, inner: EventSink) -> None:
        self.inner = inner
        self.logs: dict[str, TokenLog] = {}
        self._drops: set[asyncio.TimerHandle] = set()

    def open(self, job_id: str) -> TokenLog:
        """The job's log, created on first use."""
        entry = self.logs.get(job_id)
        if entry is None:
            entry = self.logs[job_id] = TokenLog()
        return entry

    def close(self) -> None:
        for handle in self._drops:
            handle.cancel()
        self._drops.clear()

    # -- EventSink ------------------------------------------------------------------------------------------------
    def subscribe(self, job: Job, subscriber: Any) -> None:
        self.inner.subscribe(job, subscriber)

    def relay(self, job: Job, message: dict[str, Any]) -> None:
        self.inner.relay(job, message)  # the token log of a job run elsewhere is that replica's

    def job_event(self, job: Job, message: dict[str, Any]) -> None:
        self.inner.job_event(job, message)
        if job.kind != KIND:
            return
        if job.terminal:
            self._end(job.id)
        elif message["type"] in LOGGED:
            self.open(job.id).add(message)
            if message["type"] == "token":
                progress = job.progress or {"stage": "generation", "generated_tokens": 0}
                progress["generated_tokens"] = progress.get("generated_tokens", 0) + 1
                progress["max_new_tokens"] = job.request["options"]["max_new_tokens"]
                progress["num_completions"] = job.request["options"]["num_completions"]
                job.progress = progress

    def queue_changed(self) -> None:
        self.inner.queue_changed()

    def broadcast(self, message: dict[str, Any]) -> None:
        self.inner.broadcast(message)

    def _end(self, job_id: str) -> None:
        entry = self.logs.get(job_id)
        if entry is None or entry.done:
            return
        entry.finish()

        def drop() -> None:
            self._drops.discard(handle)
            if self.logs.get(job_id) is entry:
                del self.logs[job_id]

        handle = asyncio.get_running_loop().call_later(LOG_RETENTION_SECONDS, drop)
        self._drops.add(handle)


class Listener(Protocol):
    """Who asked for a chain (a WebSocket connection): it hears the chain's own messages and follows its jobs."""

    id: str
    identity: Any  # the caller; its `key` owns the chain's jobs
    closed: bool

    def send(self, message: Any) -> None: ...


@dataclass
class Chain:
    """A `generate_and_analyze` request between its generation and its analysis."""

    generation_id: str
    client_request_id: str | None
    connection: Listener
    owner: str | None
    analysis: dict[str, Any]  # model_id and options (only those the client set) of the analysis
    analysis_id: str | None = None
    cancelled: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)


def final_message(job: Job) -> dict[str, Any]:
    """`generation_complete`: the full texts (the web UI's shape), the prompt and the run's metadata."""
    r = job.result or {}
    return {
        "type": "generation_complete",
        "completions": r.get("completions", []),
        "finish_reasons": r.get("finish_reasons", []),
        "prompt": r.get("prompt"),
        "prompt_tokens": r.get("prompt_tokens"),
        "completion_tokens": r.get("completion_tokens", []),
        "metadata": r.get("metadata", {}),
    }


def replay(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The token messages of a finished generation rebuilt from its result, in the order they were streamed
    (step by step, completions in order at each step; positions count the prompt's tokens)."""
    texts: list[list[str]] = result.get("token_texts") or []
    ids: list[list[int]] = result.get("token_ids") or []
    reasons: list[str] = result.get("finish_reasons") or []
    start = int(result.get("prompt_tokens") or 0)
    out = []
    for t in range(max((len(x) for x in texts), default=0)):
        for c, pieces in enumerate(texts):
            if t < len(pieces):
                last = t == len(pieces) - 1
                out.append(
                    {
                        "type": "token",
                        "token": pieces[t],
                        "token_id": ids[c][t],
                        "position": start + t,
                        "finish_reason": reasons[c] if last and c < len(reasons) else None,
                        "completion": c,
                    }
                )
    return out


class GenerateKind(WholeJobKind):
    """Runs `generate` jobs whole: samples the completions on a worker thread, one message per token."""

    names = (KIND,)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def final_message(self, job: Job) -> dict[str, Any]:
        return final_message(job)

    def run(self, ctx: JobContext) -> dict[str, Any]:
        job = ctx.job
        req, o = job.request, job.request["options"]
        greq = GenerationRequest(
            text=req.get("text"),
            messages=req.get("messages"),
            max_new_tokens=o["max_new_tokens"],
            temperature=o["temperature"],
            top_p=o["top_p"],
            seed=o["seed"],
            num_completions=o["num_completions"],
            stop_at_end_of_turn=o.get("stop_at_end_of_turn", True),
            max_prompt_tokens=self.settings.max_tokens,
            steer=self._steer(ctx, o.get("steer")),
        )
        n = greq.num_completions
        texts: list[list[str]] = [[] for _ in range(n)]
        ids: list[list[int]] = [[] for _ in range(n)]
        result = GenerationResult(prompt="", prompt_tokens=0)
        limit = self.settings.request_timeout
        started = time.monotonic()
        ctx.emit({"type": "processing", "stage": "generation", "message": "Generating", "device": ctx.device})
        try:
            for ev in stream(ctx.nla.subject, greq, result):
                if ctx.cancelled():
                    return {}
                if limit and time.monotonic() - started > limit:
                    raise AnalysisError(f"the request took longer than REQUEST_TIMEOUT ({limit:g} s)")
                texts[ev.completion].append(ev.token)
                ids[ev.completion].append(ev.token_id)
                ctx.emit(
                    {
                        "type": "token",
                        "token": ev.token,
                        "token_id": ev.token_id,
                        "position": ev.position,
                        "finish_reason": ev.finish_reason,
                        "completion": ev.completion,
                    }
                )
        except GenerationError as exc:
            raise AnalysisError(str(exc)) from None
        seconds = time.monotonic() - started
        produced = sum(len(x) for x in ids)
        steer = (
            {"steer": GenerationSteerOption.model_validate(o["steer"]).resolved().describe()}
            if o.get("steer")
            else {}
        )
        return {
            "completions": result.completions,
            "finish_reasons": result.finish_reasons,
            "prompt": result.prompt,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": [len(x) for x in ids],
            "token_texts": texts,
            "token_ids": ids,
            "metadata": {
                "model_id": job.model_id,
                "group_id": job.group_id,
                "device": ctx.device,
                **{k: o[k] for k in ("max_new_tokens", "temperature", "top_p", "seed", "num_completions")},
                "processing_time": round(seconds, 3),
                "tokens_per_second": round(produced / seconds, 2) if seconds > 0 else None,
                "queue_seconds": round((job.started_at or job.created_at) - job.created_at, 3),
                **steer,
            },
        }

    def _steer(self, ctx: JobContext, wire: dict[str, Any] | None) -> ResidualSteer | None:
        """The stored `steer` option made concrete on this model: its unit direction at the NLA's layer."""
        if wire is None:
            return None
        spec = GenerationSteerOption.model_validate(wire).resolved()
        try:
            direction = resolve_direction(ctx.nla, spec, max_tokens=self.settings.max_tokens)
        except SteerError as exc:
            raise AnalysisError(str(exc)) from None
        return ResidualSteer(ctx.nla.layer, direction, spec.alpha, spec.positions)


class Generations:
    """Submits generations and their chains, and streams their messages; one per app."""

    def __init__(
        self,
        scheduler: Scheduler,
        registry: Registry,
        settings: Settings,
        logs: TokenLogs,
        submit_analysis: SubmitAnalysis,
    ) -> None:
        self.scheduler = scheduler
        self.registry = registry
        self.settings = settings
        self.logs = logs
        self.submit_analysis = submit_analysis
        self.chains: dict[str, Chain] = {}  # generation job id -> chain waiting for it
        self._tasks: set[asyncio.Task[Any]] = set()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- submission -----------------------------------------------------------------------------------------------
    def request_of(self, wanted: dict[str, Any], model_id: str, *, slim: str | None = None) -> dict[str, Any]:
        """What the job stores: the input and every sampling setting, the ones the client left out taken from
        the model's generation_config. `wanted` is `{text | messages, options}` with only the options set."""
        length = text_length(wanted)
        if length > self.settings.max_text_length:
            raise SchedulerError(
                400,
                f"the prompt has {length} characters, more than MAX_TEXT_LENGTH "
                f"({self.settings.max_text_length})",
            )
        config = self.registry.model(model_id).generation_config
        o = wanted.get("options") or {}

        def given(name: str, default: Any) -> Any:
            return o[name] if o.get(name) is not None else default

        options = {
            "max_new_tokens": int(o.get("max_new_tokens") or config.get("max_new_tokens", 100)),
            "temperature": float(given("temperature", config.get("temperature", 1.0))),
            "top_p": float(given("top_p", config.get("top_p", DEFAULT_TOP_P))),
            "seed": int(given("seed", DEFAULT_SEED)),
            "num_completions": int(o.get("num_completions") or 1),
            "stop_at_end_of_turn": given("stop_at_end_of_turn", True),
        }
        if o.get("steer") is not None:
            options["steer"] = o["steer"]
        out: dict[str, Any] = {"options": options}
        if wanted.get("text") is not None:
            out["text"] = wanted["text"]
        else:
            out["messages"] = list(wanted.get("messages") or [])
        if slim is not None:
            out["slim"] = slim
        return out

    async def submit(
        self,
        wanted: dict[str, Any],
        *,
        model_id: str,
        owner: str | None,
        client_request_id: str | None = None,
        subscriber: Any = None,
        slim: str | None = None,
    ) -> Job:
        """Queue a generation on `model_id` (already resolved and checked for the client)."""
        request = self.request_of(wanted, model_id, slim=slim)
        job = await self.scheduler.submit(
            KIND,
            request,
            model_id=model_id,
            client_request_id=client_request_id,
            owner=owner,
            subscriber=subscriber,
        )
        self.logs.open(job.id)
        return job

    # -- streams --------------------------------------------------------------------------------------------------
    async def events(
        self, job_id: str, keepalive: float = 10.0, *, submitted: bool = False
    ) -> AsyncIterator[dict[str, Any] | None]:
        """Every message of a generation from its start: `queued` when it waits (or was just `submitted`), the
        tokens so far, then live ones, then its final message. `None` items are keep-alives (nothing happened
        for `keepalive` seconds)."""
        job = await self.scheduler.get(job_id)
        if job is None:
            raise UnknownRequest(job_id)
        if job.kind != KIND:
            raise SchedulerError(400, f"request {job_id} is a {job.kind} request, not a generation")
        ids = {"request_id": job.id, "client_request_id": job.client_request_id}
        entry = self.logs.logs.get(job.id)
        if entry is None and not job.terminal and job.id in self.scheduler.jobs:
            entry = self.logs.open(job.id)
        if job.status == QUEUED or submitted:
            yield self._queued(job, job.submitted_position if submitted else None)
        sent = 0
        if entry is not None:
            while True:
                while sent < len(entry.events):
                    yield {**entry.events[sent], **ids}
                    sent += 1
                if entry.done:
                    break
                if not await entry.changed(keepalive):
                    current = self.scheduler.jobs.get(job.id)
                    yield self._queued(current) if current is not None and current.status == QUEUED else None
        final = await self.scheduler.get(job.id)
        assert final is not None
        if entry is None and final.status == COMPLETED and final.result:
            for message in replay(final.result):
                yield {**message, **ids}
        yield {**self.scheduler.final_message(final), **ids}

    def _queued(self, job: Job, position: int | None = None) -> dict[str, Any]:
        return {
            "type": "queued",
            "request_id": job.id,
            "client_request_id": job.client_request_id,
            "context": KIND,
            "model_id": job.model_id,
            "queue_position": self.scheduler.queue_position(job.id) or position,
            "queue_size": self.scheduler.queue_summary()["queue_size"],
        }

    # -- generate_and_analyze -------------------------------------------------------------------------------------
    async def submit_chain(
        self,
        wanted: dict[str, Any],
        analysis_options: dict[str, Any],
        *,
        model_id: str,
        analysis_model_id: str,
        client_request_id: str | None,
        connection: Listener,
    ) -> Job:
        """Queue the generation (one completion; client_request_id + "_gen") and chain its analysis, whose
        options (only those the client set) are checked now."""
        try:
            await self.scheduler.check_analysis(analysis_model_id, analysis_options)
        except AnalysisError as exc:
            raise SchedulerError(400, str(exc)) from None
        crid = client_request_id
        single = {**wanted, "options": {**(wanted.get("options") or {}), "num_completions": 1}}
        job = await self.submit(
            single,
            model_id=model_id,
            owner=connection.identity.key,
            subscriber=connection,
            client_request_id=f"{crid}_gen" if crid else None,
        )
        chain = Chain(
            generation_id=job.id,
            client_request_id=crid,
            connection=connection,
            owner=connection.identity.key,
            analysis={"model_id": analysis_model_id, "options": analysis_options},
        )
        self.chains[job.id] = chain
        chain.task = self._spawn(self._run_chain(chain))
        return job

    def pending_chain(self, connection_id: str, client_request_id: str) -> Chain | None:
        """The chain of this connection with this client_request_id whose analysis is not queued yet."""
        for chain in self.chains.values():
            if (
                chain.client_request_id == client_request_id
                and chain.connection.id == connection_id
                and chain.analysis_id is None
            ):
                return chain
        return None

    async def cancel_chain(self, chain: Chain) -> Job:
        """Cancel a chain before its analysis is queued: its generation is cancelled (if still running)."""
        chain.cancelled = True
        job = await self.scheduler.get(chain.generation_id)
        assert job is not None
        if not job.terminal:
            job = await self.scheduler.cancel(job.id)
        return job

    async def _run_chain(self, chain: Chain) -> None:
        conn, crid = chain.connection, chain.client_request_id
        try:
            job = await self.scheduler.wait(chain.generation_id)
            if job.status != COMPLETED or chain.cancelled:
                ended = "cancelled" if chain.cancelled or job.status == CANCELLED else job.status
                text = f"the generation {job.id} was {ended}; nothing to analyse"
                ids = {"request_id": None, "client_request_id": crid, "generation_request_id": job.id}
                if ended == "cancelled":
                    conn.send({"type": "request_cancelled", **ids, "message": text})
                else:
                    conn.send({"type": "error", **ids, "error": f"{text} ({job.error})", "code": 409})
                return
            result = job.result or {}
            text = str(result.get("prompt", "")) + str((result.get("completions") or [""])[0])
            request = {"text": text, "options": dict(chain.analysis["options"])}
            try:
                analysis = await self.submit_analysis(
                    request,
                    model_id=chain.analysis["model_id"],
                    client_request_id=crid,
                    owner=chain.owner,
                    subscriber=None if conn.closed else conn,
                )
                chain.analysis_id = analysis.id
            except (SchedulerError, AnalysisError) as exc:
                detail = exc.detail if isinstance(exc, SchedulerError) else str(exc)
                conn.send(
                    {
                        "type": "error",
                        "error": f"the analysis of generation {job.id} could not be queued: {detail}",
                        "code": exc.status if isinstance(exc, SchedulerError) else 400,
                        "request_id": None,
                        "client_request_id": crid,
                        "generation_request_id": job.id,
                    }
                )
        except Exception:
            log.exception("the chain of generation %s failed", chain.generation_id)
        finally:
            self.chains.pop(chain.generation_id, None)
