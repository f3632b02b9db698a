"""Held-out evaluation of a checkpoint against baselines measured in the same run.

For each held-out activation, 16 explanations are sampled once (one seeded stream per sample), so best-of-k for
k = 1, 2, 4, 8, 16 is the minimum over the first k of the same samples. Reported per k: FVE (official
definition, 1 − mean nMSE / Var with the checkpoint's training-set variance), nMSE, raw MSE, relative RMSE,
cosine; KL of the subject's next-token prediction with Â patched in (full left context) at k = 8. Baselines: the
untrained init of the same architecture, and the same checkpoint with the explanation blanked (every explanation
token replaced by a space: what the reconstructor gets from the current token alone).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import metrics as M
from ..checkpoint import NLA
from ..kvcache import KVCache, PrefixView
from ..reconstructor import SoftPromptReconstructor
from ..sampling import row_uniforms
from ..verbalizer import LayerReplacementVerbalizer
from .data import ActivationSet

KS = (1, 2, 4, 8, 16)


@dataclass
class Scored:
    ids: Tensor  # [n, K, T] sampled explanation ids
    hats: Tensor  # [n, K, d]
    scores: Tensor  # [n, K] the objective (nmse or mse)


def _parts(nla: NLA) -> tuple[LayerReplacementVerbalizer, SoftPromptReconstructor]:
    v, r = nla.verbalizer, nla.reconstructor
    if not isinstance(v, LayerReplacementVerbalizer) or not isinstance(r, SoftPromptReconstructor):
        raise ValueError(
            "eval supports the frozen-base design (layer-replacement verbalizer, soft-prompt reconstructor)"
        )
    return v, r


def sample_and_score(
    nla: NLA, A: Tensor, cur: Tensor, k: int, seed: int, temperature: float, batch: int = 32
) -> Scored:
    v, r = _parts(nla)
    ids_all, hats_all = [], []
    with torch.no_grad():
        for s in range(0, len(A), batch):
            a = A[s : s + batch]
            u = row_uniforms(seed, [(s + i, j) for i in range(len(a)) for j in range(k)], v.t_text)
            ids = torch.tensor([e.ids for e in v.generate(a, k, u, temperature)])
            hats = r(ids, cur[s : s + batch].repeat_interleave(k))
            ids_all.append(ids.view(len(a), k, -1))
            hats_all.append(hats.view(len(a), k, -1))
    ids_t, hats_t = torch.cat(ids_all), torch.cat(hats_all)
    rep = A.unsqueeze(1).expand_as(hats_t)
    scores = M.nmse(rep, hats_t) if nla.objective == "nmse" else M.mse(rep, hats_t)
    return Scored(ids_t, hats_t, scores)


def metric_row(A: Tensor, hats: Tensor, variance: float) -> dict[str, float]:
    n = M.nmse(A, hats)
    return {
        "fve": float(1 - n.mean() / variance),
        "nmse": float(n.mean()),
        "mse": float(M.mse(A, hats).mean()),
        "relative_rmse": float(M.relative_rmse(A, hats).mean()),
        "cosine": float(M.cosine(A, hats).mean()),
    }


def best_of(scored: Scored, k: int) -> tuple[Tensor, Tensor]:
    j = scored.scores[:, :k].argmin(1)
    rows = torch.arange(len(j))
    return scored.hats[rows, j], scored.ids[rows, j]


def kl_at(nla: NLA, data: ActivationSet, idx: Tensor, hats: Tensor) -> float:
    """Mean KL(P_clean ‖ P_patched) at each sample's position, with its window prefix as left context."""
    lm = nla.subject
    out = []
    with torch.no_grad():
        for i, h in zip(idx.tolist(), hats, strict=True):
            toks = [t for t in data.ctx[i].tolist() if t >= 0]
            ids = torch.tensor(toks, dtype=torch.long, device=lm.device).unsqueeze(0)
            S = ids.shape[1]
            pos = torch.arange(S, device=lm.device).unsqueeze(0)
            cache = KVCache(1, S)
            final = lm.final_norm(lm.forward(lm.add_positions(lm.embed(ids), pos), pos, cache=cache)[0, -1])
            p = torch.tensor([[S - 1]], device=lm.device)
            view = PrefixView(cache, torch.arange(S, device=lm.device).unsqueeze(0) < S - 1)
            patched = lm.forward(h.to(lm.dtype).view(1, 1, -1), p, start=nla.layer + 1, cache=view)[0, 0]
            out.append(
                float(
                    M.kl_from_logits(
                        lm.logits(final).unsqueeze(0), lm.logits(lm.final_norm(patched)).unsqueeze(0)
                    )[0]
                )
            )
    return sum(out) / len(out)


def evaluate(
    nla: NLA,
    data: ActivationSet,
    *,
    untrained: NLA | None = None,
    n: int = 512,
    kl_samples: int = 128,
    seed: int = 0,
    temperature: float = 1.0,
    ks: tuple[int, ...] = KS,
) -> dict[str, Any]:
    variance = nla.fve_variance or float(data.meta.get("train_variance") or M.normalized_variance(data.acts))
    n = min(n, len(data))
    idx = torch.arange(n)
    A, cur = data.acts[idx], data.current[idx]
    kmax = max(ks)
    scored = sample_and_score(nla, A, cur, kmax, seed, temperature)
    report: dict[str, Any] = {
        "n": n,
        "variance": variance,
        "temperature": temperature,
        "seed": seed,
        "best_of_k": {},
    }
    for k in ks:
        hats, _ = best_of(scored, k)
        report["best_of_k"][str(k)] = metric_row(A, hats, variance)
    kl_idx = idx[: min(kl_samples, n)]
    hats8, _ = best_of(scored, min(8, kmax))
    report["best_of_k"][str(min(8, kmax))]["kl"] = kl_at(nla, data, kl_idx, hats8[: len(kl_idx)])
    v, r = _parts(nla)
    with torch.no_grad():
        blank = torch.full((n, v.t_text), r.space_id, dtype=torch.long)
        blank_hats = torch.cat([r(blank[s : s + 64], cur[s : s + 64]) for s in range(0, n, 64)])
    report["blank"] = metric_row(A, blank_hats, variance)
    report["blank"]["kl"] = kl_at(nla, data, kl_idx, blank_hats[: len(kl_idx)])
    if untrained is not None:
        u_scored = sample_and_score(untrained, A, cur, min(8, kmax), seed, temperature)
        u_hats, _ = best_of(u_scored, min(8, kmax))
        report["untrained_k8"] = metric_row(A, u_hats, variance)
        report["untrained_k8"]["kl"] = kl_at(untrained, data, kl_idx, u_hats[: len(kl_idx)])
    report["samples"] = _examples(nla, data, scored, idx)
    return report


def _examples(
    nla: NLA, data: ActivationSet, scored: Scored, idx: Tensor, count: int = 20
) -> list[dict[str, Any]]:
    """A fixed rule picks the examples shown in the docs: every (n // count)-th held-out sample, in order."""
    tok = nla.subject.tokenizer
    hats8, ids8 = best_of(scored, 8)
    step = max(1, len(idx) // count)
    out = []
    var = nla.fve_variance or 1.0
    for i in list(range(0, len(idx), step))[:count]:
        ctx = [t for t in data.ctx[int(idx[i])].tolist() if t >= 0]
        A = data.acts[int(idx[i])]
        n = float(M.nmse(A, hats8[i]))
        out.append(
            {
                "context": tok.decode(ctx[-24:-1]),
                "token": tok.decode([ctx[-1]]),
                "explanation": tok.decode(ids8[i].tolist()),
                "fve": 1 - n / var,
                "cosine": float(M.cosine(A, hats8[i])),
                "relative_rmse": float(M.relative_rmse(A, hats8[i])),
            }
        )
    return out


def write_report(report: dict[str, Any], out: Path, title: str) -> None:
    """JSON, a markdown table and a PNG of FVE against k (with the baselines)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# {title}",
        "",
        f"{report['n']} held-out activations, temperature {report['temperature']}, FVE variance {report['variance']:.4f}",
        "",
    ]
    lines.append("| explanations | FVE | nMSE | MSE | relative RMSE | cosine | KL (nats) |")
    lines.append("|---|---|---|---|---|---|---|")

    def row(name: str, m: dict[str, float]) -> str:
        kl = f"{m['kl']:.4f}" if "kl" in m else "–"
        return f"| {name} | {m['fve']:.4f} | {m['nmse']:.4f} | {m['mse']:.3f} | {m['relative_rmse']:.4f} | {m['cosine']:.4f} | {kl} |"

    for k, m in report["best_of_k"].items():
        lines.append(row(f"trained, best of {k}", m))
    lines.append(row("blanked explanation (current token only)", report["blank"]))
    if "untrained_k8" in report:
        lines.append(row("untrained init, best of 8", report["untrained_k8"]))
    (out / "eval.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [int(k) for k in report["best_of_k"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [report["best_of_k"][str(k)]["fve"] for k in ks], marker="o", label="trained")
    ax.axhline(report["blank"]["fve"], color="gray", linestyle="--", label="blanked explanation")
    if "untrained_k8" in report:
        ax.axhline(report["untrained_k8"]["fve"], color="red", linestyle=":", label="untrained init (k=8)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("best of k")
    ax.set_ylabel("FVE (held-out)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "best_of_k.png", dpi=100)
    plt.close(fig)
