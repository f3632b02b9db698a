"""Evaluation of a checkpoint against baselines measured in the same run, always compared at equal k.

For each activation, 16 explanations are sampled once (one seeded stream per sample), so best-of-k for
k = 1, 2, 4, 8, 16 is the minimum over the first k of the same samples. Reported per k: FVE (official
definition, 1 − mean nMSE / Var with the checkpoint's training-set variance) with its standard error, nMSE, raw
MSE, relative RMSE, cosine; KL of the subject's next-token prediction with Â patched in (the sample's whole
window as left context) at k = 1 and k = 8.

Baselines that mean what they say:
* token mean: the mean training activation of the current token id (the global mean for tokens never seen in
  training), what is known without any explanation;
* selection control, per k: best of k over the explanations sampled for *other* activations (a seeded pairing
  across documents), reconstructed with this sample's current token: what oracle selection alone buys;
* the untrained init of the same architecture, per k.
The claims of the explanations (genre, quoted words, expected next token: `nla/explanations.py`) are checked
against each sample (`claims.py`), for the trained k = 1 and best of 8 and for the selection control.
Gaps are quoted at equal k only (trained best of k against the control's best of k; k = 1 against the token mean
and the untrained k = 1). The blank explanation (spaces only) is kept as a diagnostic: the reconstructor never saw
such an input, so it is no baseline.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import metrics as M
from ..checkpoint import NLA
from ..explanations import check_claims
from ..kvcache import KVCache, PrefixView
from ..reconstructor import SoftPromptReconstructor
from ..sampling import step_seeds
from ..verbalizer import LayerReplacementVerbalizer
from .claims import claim_report, claims_markdown, sample_evidence
from .data import ActivationSet, cross_document_derangement, same_document_fraction

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
            u = step_seeds(seed, [(s + i, j) for i in range(len(a)) for j in range(k)], v.t_text)
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
        "fve_se": float(n.std() / len(n) ** 0.5 / variance) if len(n) > 1 else 0.0,
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


def _require_kl_context(data: ActivationSet, idx: Tensor) -> None:
    """KL re-runs the subject on each sample's stored context: refuse when that is not the whole window prefix
    the activation was computed from (a dataset extracted with `context` < `window`)."""
    kept = (data.ctx[idx] >= 0).sum(1)
    short = (kept < data.pos[idx] + 1).nonzero().flatten()
    if len(short):
        i = int(idx[short[0]])
        raise ValueError(
            f"sample {i} keeps {int(kept[short[0]])} context tokens but sits at window position {int(data.pos[i])}: "
            "KL needs the whole window before it (extract with context equal to window), or pass --kl-samples 0"
        )


def token_means(train: ActivationSet) -> tuple[dict[int, Tensor], Tensor]:
    """Mean training activation per current token id, and the global mean (the fallback for unseen tokens)."""
    cur = train.current
    uniq, inverse = torch.unique(cur, return_inverse=True)
    sums = torch.zeros(len(uniq), train.acts.shape[1]).index_add_(0, inverse, train.acts.float())
    counts = torch.bincount(inverse, minlength=len(uniq)).float().unsqueeze(1)
    means = sums / counts
    return {int(t): means[i] for i, t in enumerate(uniq.tolist())}, train.acts.float().mean(0)


def _reconstruct(r: SoftPromptReconstructor, ids: Tensor, cur: Tensor, batch: int = 256) -> Tensor:
    with torch.no_grad():
        return torch.cat([r(ids[s : s + batch], cur[s : s + batch]) for s in range(0, len(ids), batch)])


def _gap(A: Tensor, better: Tensor, worse: Tensor, variance: float) -> dict[str, float]:
    """FVE(better) − FVE(worse) on the same samples, with the paired standard error."""
    d = (M.nmse(A, worse) - M.nmse(A, better)) / variance
    return {"fve_gap": float(d.mean()), "se": float(d.std() / len(d) ** 0.5) if len(d) > 1 else 0.0}


def evaluate(
    nla: NLA,
    data: ActivationSet,
    *,
    train: ActivationSet | None = None,
    untrained: NLA | None = None,
    n: int = 512,
    kl_samples: int = 128,
    seed: int = 0,
    temperature: float = 1.0,
    ks: tuple[int, ...] = KS,
) -> dict[str, Any]:
    """Metrics of `nla` on the first `n` samples of `data` against the baselines above, at equal k.

    `train` (the training split) gives the token-mean baseline; without it that baseline is left out.
    """
    for d in (data, train):
        if d is not None:
            d.require_subject(nla.subject, nla.subject_source, nla.layer)
    variance = nla.fve_variance or float(data.meta.get("train_variance") or M.normalized_variance(data.acts))
    n = min(n, len(data))
    idx = torch.arange(n)
    kl_idx = idx[: min(kl_samples, n)]
    if len(kl_idx):
        _require_kl_context(data, kl_idx)
    A, cur = data.acts[idx], data.current[idx]
    kmax = max(ks)
    v, r = _parts(nla)
    scored = sample_and_score(nla, A, cur, kmax, seed, temperature)
    report: dict[str, Any] = {
        "n": n,
        "split": data.split,
        "variance": variance,
        "temperature": temperature,
        "seed": seed,
        "kl_samples": len(kl_idx),
        "best_of_k": {},
        "selection_control": {},
    }

    # A direction-only reconstructor's output norm is arbitrary: unit-dependent figures (MSE, relative RMSE, KL)
    # use every row's reconstruction at ‖A‖, as analysis does; FVE, nMSE and cosine do not depend on it.
    at_norm = nla.objective == "nmse"
    report["unit_metrics_at_norm_of_A"] = at_norm

    def unit(hats: Tensor) -> Tensor:
        return M.rescale_to_norm(hats, A[: len(hats)]) if at_norm else hats

    def kl(model: NLA, hats: Tensor) -> float | None:
        return kl_at(model, data, kl_idx, hats[: len(kl_idx)]) if len(kl_idx) else None

    def row(hats: Tensor) -> dict[str, float]:
        return metric_row(A, hats, variance)

    def with_kl(row: dict[str, float], value: float | None) -> dict[str, float]:
        return {**row, "kl": value} if value is not None else row

    # selection control: the same k samples, but those drawn for another document's activation
    perm = cross_document_derangement(data.doc_key[idx], seed)
    report["selection_control_same_document"] = same_document_fraction(data.doc_key[idx], perm)
    T = scored.ids.shape[2]
    ctrl_hats = _reconstruct(r, scored.ids[perm].reshape(-1, T), cur.repeat_interleave(kmax)).view(
        n, kmax, -1
    )
    rep = A.unsqueeze(1).expand_as(ctrl_hats)
    ctrl = Scored(
        scored.ids[perm],
        ctrl_hats,
        M.nmse(rep, ctrl_hats) if nla.objective == "nmse" else M.mse(rep, ctrl_hats),
    )
    best: dict[int, Tensor] = {}
    ctrl_best: dict[int, Tensor] = {}
    for k in ks:
        best[k] = unit(best_of(scored, k)[0])
        ctrl_best[k] = unit(best_of(ctrl, k)[0])
        kl_k = kl(nla, best[k]) if k in (1, 8) else None
        report["best_of_k"][str(k)] = with_kl(row(best[k]), kl_k)
        kl_c = kl(nla, ctrl_best[k]) if k == 8 else None
        report["selection_control"][str(k)] = with_kl(row(ctrl_best[k]), kl_c)
    gaps: dict[str, dict[str, Any]] = {
        str(k): {"vs_selection_control": _gap(A, best[k], ctrl_best[k], variance)} for k in ks
    }
    if train is not None:
        means, global_mean = token_means(train)
        tm_hats = unit(torch.stack([means.get(int(t), global_mean) for t in cur.tolist()]))
        seen = sum(int(t) in means for t in cur.tolist())
        report["token_mean"] = {
            **with_kl(row(tm_hats), kl(nla, tm_hats)),
            "train_samples": len(train),
            "seen_fraction": seen / n,
        }
        gaps[str(ks[0])]["vs_token_mean"] = _gap(A, best[ks[0]], tm_hats, variance)
    if untrained is not None:
        uk = [k for k in ks if k <= 8]
        u_scored = sample_and_score(untrained, A, cur, max(uk), seed, temperature)
        report["untrained"] = {}
        for k in uk:
            u_hats = unit(best_of(u_scored, k)[0])
            report["untrained"][str(k)] = with_kl(row(u_hats), kl(untrained, u_hats) if k == 8 else None)
            gaps[str(k)]["vs_untrained"] = _gap(A, best[k], u_hats, variance)
    report["gaps"] = gaps
    tok = nla.subject.tokenizer
    report["claims"] = {
        "trained, k = 1": claim_report(tok, data, idx, scored.ids[:, 0]),
        f"trained, best of {min(8, kmax)}": claim_report(tok, data, idx, best_of(scored, min(8, kmax))[1]),
        "selection control, k = 1": claim_report(tok, data, idx, ctrl.ids[:, 0]),
    }
    blank = torch.full((n, v.t_text), r.space_id, dtype=torch.long)
    report["blank_diagnostic"] = row(unit(_reconstruct(r, blank, cur)))
    report["samples"] = _examples(nla, data, scored, idx)
    return report


def _examples(
    nla: NLA, data: ActivationSet, scored: Scored, idx: Tensor, count: int = 20
) -> list[dict[str, Any]]:
    """A fixed rule picks the examples shown in the docs: every (n // count)-th held-out sample, in order."""
    tok = nla.subject.tokenizer
    hats8, ids8 = best_of(scored, 8)
    if (
        nla.objective == "nmse"
    ):  # a direction-only reconstruction is read at ‖A‖ (relative RMSE depends on it)
        hats8 = M.rescale_to_norm(hats8, data.acts[idx])
    step = max(1, len(idx) // count)
    out = []
    var = nla.fve_variance or 1.0
    genres = data.genres()
    for i in list(range(0, len(idx), step))[:count]:
        ctx = [t for t in data.ctx[int(idx[i])].tolist() if t >= 0]
        A = data.acts[int(idx[i])]
        n = float(M.nmse(A, hats8[i]))
        explanation = tok.decode(ids8[i].tolist())
        recent, nexts = sample_evidence(tok, data, int(idx[i]))
        verdict = check_claims(explanation, genres[int(idx[i])], recent, nexts)
        out.append(
            {
                "context": tok.decode(ctx[-24:-1]),
                "token": tok.decode([ctx[-1]]),
                "explanation": explanation,
                "genre": genres[int(idx[i])],
                "claims": asdict(verdict),
                "fve": 1 - n / var,
                "cosine": float(M.cosine(A, hats8[i])),
                "relative_rmse": float(M.relative_rmse(A, hats8[i])),
            }
        )
    return out


def write_report(report: dict[str, Any], out: Path, title: str) -> None:
    """JSON, a markdown table (every row at its k, then the gaps at equal k) and a PNG of FVE against k."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    where = {"heldout": "held-out", "train": "TRAINING-SET (not held-out)"}.get(
        report["split"], report["split"]
    )
    lines = [
        f"# {title}",
        "",
        f"{report['n']} {where} activations, temperature {report['temperature']}, seed {report['seed']}, "
        f"FVE variance {report['variance']:.4f}; KL on the first {report['kl_samples']}. "
        "± is one standard error over the samples.",
        "",
        "| explanations | k | FVE | nMSE | MSE | relative RMSE | cosine | KL (nats) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def row(name: str, k: str, m: dict[str, float]) -> str:
        kl = f"{m['kl']:.4f}" if m.get("kl") is not None else "–"
        return (
            f"| {name} | {k} | {m['fve']:.4f} ± {m['fve_se']:.4f} | {m['nmse']:.4f} | {m['mse']:.3f} | "
            f"{m['relative_rmse']:.4f} | {m['cosine']:.4f} | {kl} |"
        )

    for k, m in report["best_of_k"].items():
        lines.append(row("trained", k, m))
    for k, m in report["selection_control"].items():
        lines.append(row("selection control (explanations of other documents' activations)", k, m))
    for k, m in report.get("untrained", {}).items():
        lines.append(row("untrained init", k, m))
    if "token_mean" in report:
        tm = report["token_mean"]
        lines.append(
            row(
                f"token mean ({tm['train_samples']} training activations; {tm['seen_fraction']:.0%} of tokens seen)",
                "–",
                tm,
            )
        )
    lines.append(
        row("blank explanation (diagnostic only: never a training input)", "–", report["blank_diagnostic"])
    )
    lines += ["", "Gaps in FVE at equal k (trained minus baseline, paired over the same samples):", ""]
    names = {
        "vs_selection_control": "selection control",
        "vs_untrained": "untrained init",
        "vs_token_mean": "token mean",
    }
    lines += ["| k | " + " | ".join(names.values()) + " |", "|---|---|---|---|"]
    for k, g in report["gaps"].items():
        cells = [f"{g[key]['fve_gap']:+.4f} ± {g[key]['se']:.4f}" if key in g else "–" for key in names]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if report.get("claims"):
        lines += ["", *claims_markdown(report["claims"])]
    (out / "eval.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in (
        ("best_of_k", "trained", "-"),
        ("selection_control", "selection control", "--"),
        ("untrained", "untrained init", ":"),
    ):
        curve = report.get(key) or {}
        if curve:
            ks = [int(k) for k in curve]
            ax.plot(ks, [curve[str(k)]["fve"] for k in ks], marker="o", linestyle=style, label=label)
    if "token_mean" in report:
        ax.axhline(
            report["token_mean"]["fve"], color="gray", linestyle="-.", label="token mean (no explanation)"
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("best of k")
    ax.set_ylabel(f"FVE ({where})")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "best_of_k.png", dpi=100)
    plt.close(fig)
