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
"""

from __future__ import annotations

import math

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


def all_metrics(a: Tensor, b: Tensor, variance: float | None) -> dict[str, Tensor | None]:
    n = nmse(a, b)
    return {
        "mse": mse(a, b),
        "relative_rmse": relative_rmse(a, b),
        "cosine": cosine(a, b),
        "nmse": n,
        "fve": fve(n, variance),
    }
