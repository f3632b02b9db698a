"""Reconstruction metrics, all computed in fp32 over the last dimension.

* `mse` = mean_d (A − Â)² in activation units (what upstream reports and best-of-k minimises). For direction-only
  reconstructors (objective `nmse`) the callers first rescale Â to ‖A‖ (`rescale_to_norm`): their output norm is
  arbitrary, so only a reconstruction on A's own scale gives unit-dependent numbers that mean anything.
* `relative_rmse` = ‖A − Â‖ / ‖A‖.
* `cosine`.
* `nmse` = MSE after rescaling both vectors to norm √d, which equals 2(1 − cos): direction only.
* `fve` = 1 − nmse / Var, Var being the variance of norm-√d activations over a dataset (the "rawvar" baseline of
  the official release); without a baseline there is no FVE.
* `kl` = KL(P ‖ Q) in nats between next-token distributions given as logits.

`METRICS` is the one table of what Talkative reports: rows, summaries, the CLI table, the web UI's legend and
CSV export (served as `GET /api/v1/metrics/legend`) all read it. Adding a metric is one `Metric` entry here plus
its function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

EPS = 1e-12


def mse(a: Tensor, b: Tensor) -> Tensor:
    return (a.float() - b.float()).pow(2).mean(-1)


def relative_rmse(a: Tensor, b: Tensor) -> Tensor:
    a = a.float()
    return (a - b.float()).norm(dim=-1) / a.norm(dim=-1).clamp_min(EPS)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.float(), b.float()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(EPS)


def normalize(v: Tensor, scale: float | None = None) -> Tensor:
    """Rescale rows to L2 norm `scale` (√d by default)."""
    v = v.float()
    s = math.sqrt(v.shape[-1]) if scale is None else scale
    return v / v.norm(dim=-1, keepdim=True).clamp_min(EPS) * s


def rescale_to_norm(v: Tensor, like: Tensor) -> Tensor:
    """Rows of `v` rescaled to the L2 norms of the rows of `like` (direction of v, magnitude of like), fp32."""
    return normalize(v, 1.0) * like.float().norm(dim=-1, keepdim=True)


def nmse(a: Tensor, b: Tensor) -> Tensor:
    return (normalize(a) - normalize(b)).pow(2).mean(-1)


def fve(nmse_value: Tensor, variance: float | None) -> Tensor | None:
    if variance is None:
        return None
    return 1.0 - nmse_value / variance


def normalized_variance(vectors: Tensor) -> float:
    """Var(v̂) over a dataset: mean over rows and dims of (v̂ − mean v̂)², v̂ = v rescaled to norm √d."""
    v = normalize(vectors)
    return float((v - v.mean(0, keepdim=True)).pow(2).mean())


def kl_from_logits(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(P ‖ Q) per row, in nats."""
    lp = torch.log_softmax(p_logits.float(), dim=-1)
    lq = torch.log_softmax(q_logits.float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


# -- the table every consumer reads -----------------------------------------------------------------------------------
Better = Literal["higher", "lower"]
Role = Literal["headline", "detail", "derived"]
RowMetric = Callable[[Tensor, Tensor, "float | None"], "Tensor | None"]
FORMATS = ("native", "upstream", "official")
KL = "kl_divergence"  # the context metric: the engine computes it with the subject model, not from (A, Â)


@dataclass(frozen=True)
class Metric:
    """One reported number: what it is called where, which direction is good, what it means, and how a row gets it.

    `compute(A, Â, variance)` gives one value per row from the activation and its reconstruction as reported
    (Â at ‖A‖ under a direction-only objective). A metric without `compute` needs more than the pair (KL needs the
    subject model's forward pass with the full context): the engine fills it where it has that context, and
    leaves it null elsewhere (a bare vector has none).

    `role` decides where it is shown, so that no consumer keeps a list of names of its own:
    * `headline`: the summary lines (CLI, web UI) and the web table's default columns;
    * `detail`: a CLI column, a colour scale and a web table column one can switch on;
    * `derived`: a function of another metric (nmse = 2(1 − cos)), kept in rows, summaries, exports and the
      legend, but not printed or coloured twice.
    """

    name: str
    label: str  # the web UI's name for it (legend, colour picker, tooltip)
    short: str  # a table column's header (web UI)
    cli: str  # the terminal table's header
    title: str  # what it is, in words
    better: Better
    formula: str  # the definition, for the engine's readers
    meaning: str  # what a value says, for the UI's readers
    compute: RowMetric | None
    role: Role = "detail"
    unit: str | None = None
    digits: int = 3  # decimals in the terminal table
    formats: tuple[str, ...] = FORMATS  # the checkpoint formats that report it

    @property
    def summary_key(self) -> str:
        """Its key in a summary: the mean over the rows without a flag."""
        return f"mean_{self.name}"

    def legend(self) -> dict[str, Any]:
        """What `GET /api/v1/metrics/legend` says about it (everything but the function)."""
        return {
            "name": self.name,
            "label": self.label,
            "short": self.short,
            "cli": self.cli,
            "title": self.title,
            "better": self.better,
            "unit": self.unit,
            "formula": self.formula,
            "meaning": self.meaning,
            "role": self.role,
            "digits": self.digits,
            "formats": list(self.formats),
            "summary_key": self.summary_key,
            "per_row": self.compute is not None,
        }


class MetricTable:
    """An ordered, immutable set of metrics: the order is the order of every column, legend entry and summary key.

    `with_metric` returns a new table, so a variant (a test's extra metric, an experiment) is built next to the
    default one and handed to the NLA that reports it, never written into the shared one."""

    def __init__(self, metrics: Iterable[Metric]) -> None:
        self._metrics = tuple(metrics)
        names = [m.name for m in self._metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"metric names must be unique: {names}")
        self._by_name = {m.name: m for m in self._metrics}

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._metrics)

    def __len__(self) -> int:
        return len(self._metrics)

    def __getitem__(self, name: str) -> Metric:
        return self._by_name[name]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def with_metric(self, metric: Metric) -> MetricTable:
        return MetricTable([*self._metrics, metric])

    def shown(self, *roles: Role) -> tuple[Metric, ...]:
        """The metrics of these roles, in table order."""
        return tuple(m for m in self._metrics if m.role in roles)

    def empty(self) -> dict[str, None]:
        """Every metric null: a row before (or without) evaluation."""
        return dict.fromkeys(self._by_name)

    def measure(self, a: Tensor, b: Tensor, variance: float | None) -> dict[str, Tensor | None]:
        """The per-row metrics of A against Â (one value per row each); context metrics are left out."""
        return {m.name: m.compute(a, b, variance) for m in self._metrics if m.compute is not None}

    def summarize(self, rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
        """`mean_<name>` of every metric over `rows` (null where no row has a value)."""
        out: dict[str, float | None] = {}
        for m in self._metrics:
            values = [r[m.name] for r in rows if r.get(m.name) is not None]
            out[m.summary_key] = sum(values) / len(values) if values else None
        return out

    def legend(self) -> list[dict[str, Any]]:
        return [m.legend() for m in self._metrics]


METRICS = MetricTable(
    [
        Metric(
            name="fve",
            label="FVE",
            short="FVE",
            cli="fve",
            title="Fraction of variance explained",
            better="higher",
            formula="1 − nmse / Var, Var the checkpoint's variance of norm-√d activations (null without one)",
            meaning="1 − NMSE ÷ the variance of the activations: 1 is a perfect reconstruction, 0 is no better "
            "than the average activation. Needs the checkpoint’s activation variance.",
            compute=lambda a, b, variance: fve(nmse(a, b), variance),
            role="headline",
        ),
        Metric(
            name="relative_rmse",
            label="Relative RMSE",
            short="Rel. RMSE",
            cli="rel rmse",
            title="Relative reconstruction error",
            better="lower",
            formula="‖A − Â‖ / ‖A‖",
            meaning="‖A − Â‖ ÷ ‖A‖: the error of the vector rebuilt from the explanation, relative to the "
            "activation’s size. 0 is perfect; 1 is an error as large as the activation.",
            compute=lambda a, b, _variance: relative_rmse(a, b),
            role="headline",
        ),
        Metric(
            name="cosine",
            label="Cosine",
            short="Cosine",
            cli="cos",
            title="Cosine similarity",
            better="higher",
            formula="cos(A, Â)",
            meaning="How well the rebuilt vector points the same way as the activation: 1 is the same "
            "direction, 0 unrelated.",
            compute=lambda a, b, _variance: cosine(a, b),
            role="headline",
        ),
        Metric(
            name=KL,
            label="KL",
            short="KL",
            cli="KL",
            title="KL divergence of the prediction",
            better="lower",
            unit="nats",
            formula="KL(P ‖ Q) in nats, P the next-token distribution, Q the same with Â patched after block L",
            meaning="How much the model’s next-token prediction changes when the rebuilt vector replaces the "
            "activation. 0 is unchanged.",
            compute=None,
            role="headline",
        ),
        Metric(
            name="mse",
            label="MSE",
            short="MSE",
            cli="mse",
            title="Mean squared error",
            better="lower",
            formula="mean_d (A − Â)², activation units²",
            meaning="Mean squared difference between the activation and its reconstruction; it grows with the "
            "activation’s scale, so compare it within one text.",
            compute=lambda a, b, _variance: mse(a, b),
            digits=2,
        ),
        Metric(
            name="nmse",
            label="NMSE",
            short="NMSE",
            cli="nmse",
            title="Normalised MSE",
            better="lower",
            formula="MSE after rescaling both vectors to norm √d = 2(1 − cos)",
            meaning="The MSE after both vectors are scaled to the same length: 2 × (1 − cosine). 0 is perfect.",
            compute=lambda a, b, _variance: nmse(a, b),
            role="derived",
        ),
    ]
)
