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
from ...nla.diff import DiffError, Side, diff
from ...nla.options import resolve
from ..catalog.registry import Registry
from ..scheduling.workers import JobContext
from ..settings import Settings
from .kinds import WholeJobKind


class VectorKind(WholeJobKind):
    """The four vector kinds; `run` calls the one the job names."""

    names = ("describe", "score", "extract", "tokenize", "diff")

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self._runs: dict[str, Callable[[JobContext], dict[str, Any]]] = {
            "describe": self.describe,
            "score": self.score,
            "extract": self.extract,
            "tokenize": self.tokenize,
            "diff": self.diff,
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

    def diff(self, ctx: JobContext) -> dict[str, Any]:
        """Both sides run on this job's device: a side naming another model of the group reads that model's NLA."""
        req = ctx.job.request

        def side(wire: dict[str, Any]) -> Side:
            model_id = wire.get("model_id") or ctx.job.model_id
            nla = ctx.runtime.nlas.get(model_id or "")
            if nla is None:
                raise DiffError(ctx.runtime.errors.get(model_id or "", f"model {model_id} is not loaded"))
            return Side(nla, wire.get("text"), wire.get("messages"), int(wire.get("position", -1)), model_id)

        budget = int(
            self.registry.model_setting(self.settings, "auto_batch_size_max", model_id=ctx.job.model_id)
        )
        try:
            return diff(
                side(req["a"]),
                side(req["b"]),
                resolve({**req.get("options", {}), "no_kl": True}),
                tuned=ctx.runtime.tuned.get(ctx.job.model_id or ""),
                row_budget=budget,
                max_tokens=self.settings.max_tokens,
                cancelled=ctx.cancelled,
                encoding=req.get("encoding", "list"),
            )
        except Cancelled:
            return {}
