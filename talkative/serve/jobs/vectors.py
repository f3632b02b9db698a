"""The vector endpoints' jobs (`describe`, `score`, `extract`, `tokenize`): one job kind, run whole on a worker.

They go through the same queue, group routing, store and cancellation as analyses, so the engine never runs on
the event loop and a request for a model of another group waits for its group like any job. Each kind decodes
the stored request (vectors stay in the wire format the client sent until here) and calls `nla.vectors`; input
problems raise `AnalysisError` subclasses, which fail the job with the message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...nla import vectors as V
from ...nla.analysis import Cancelled
from ...nla.options import resolve
from ..catalog.registry import Registry
from ..scheduling.workers import JobContext
from ..settings import Settings
from .kinds import JobKind


class VectorKind(JobKind):
    """The four vector kinds; `run` calls the one the job names."""

    names = ("describe", "score", "extract", "tokenize")

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self._runs: dict[str, Callable[[JobContext], dict[str, Any]]] = {
            "describe": self.describe,
            "score": self.score,
            "extract": self.extract,
            "tokenize": self.tokenize,
        }

    def run(self, ctx: JobContext) -> dict[str, Any]:
        return self._runs[ctx.job.kind](ctx)

    def describe(self, ctx: JobContext) -> dict[str, Any]:
        req, nla = ctx.job.request, ctx.nla
        vectors = V.decode_vectors(req["vectors"], d_model=nla.d_model)
        options = resolve({**req.get("options", {}), "no_kl": True})
        budget = int(
            self.registry.model_setting(self.settings, "auto_batch_size_max", model_id=ctx.job.model_id)
        )
        try:
            return V.describe(
                nla,
                vectors,
                options,
                tokens=req.get("tokens") or (),
                tuned=ctx.runtime.tuned.get(ctx.job.model_id or ""),
                row_budget=budget,
                cancelled=ctx.cancelled,
                encoding=req.get("encoding", "list"),
            )
        except Cancelled:
            return {}

    def score(self, ctx: JobContext) -> dict[str, Any]:
        req, nla = ctx.job.request, ctx.nla
        vector = V.decode_vectors(req["vector"], d_model=nla.d_model, max_rows=1, what="vector")
        return V.score(
            nla,
            vector[0],
            req["explanations"],
            token=req.get("token"),
            salience=bool(req.get("salience")),
            return_vectors=bool(req.get("return_vectors")),
            encoding=req.get("encoding", "list"),
        )

    def extract(self, ctx: JobContext) -> dict[str, Any]:
        req = ctx.job.request
        return V.extract(
            ctx.nla,
            req.get("text"),
            req.get("messages"),
            positions=req.get("positions"),
            max_tokens=self.settings.max_tokens,
            encoding=req.get("encoding", "list"),
        )

    def tokenize(self, ctx: JobContext) -> dict[str, Any]:
        req = ctx.job.request
        return V.tokenize(ctx.nla, req.get("text"), req.get("messages"), max_tokens=self.settings.max_tokens)
