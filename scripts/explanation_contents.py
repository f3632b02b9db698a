"""Which contents of an explanation carry the most of a layer-L activation, read by a frozen reconstructor.

Before choosing the explanation language of the second demo NLA, measure each candidate content on its own and in
combination: the genre label, the subject's top next tokens, the n tokens before the current one ("Reading: ...",
ending the explanation), and the first demo's 8 tokens of raw context for reference. Each form is rendered for every sample exactly as the trainer would
(`nla/train/targets.py`, left-padded with spaces to t_text), read by the *untrained* soft-prompt reconstructor of
the demo architecture (frozen: the subject's own blocks 0..L over "Text:<explanation>" plus the current token),
and a ridge-regression head is fitted from its output to the activation on one part of the training split and
scored (FVE, the official definition against the training variance) on the rest. A frozen reader with a fitted
linear head measures what a form makes linearly available, the same measurement docs/training.md reports for the
raw-context warm start.

    python scripts/explanation_contents.py --data data/smollm2-l12-modern data/smollm2-l12-main-v2 \
        --out docs/figures/explanation-contents.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from talkative.nla import metrics as M  # noqa: E402
from talkative.nla.checkpoint import NLA  # noqa: E402
from talkative.nla.explanations import CORPUS_GENRES, Form, parse  # noqa: E402
from talkative.nla.lm import load_lm  # noqa: E402
from talkative.nla.reconstructor import SoftPromptReconstructor  # noqa: E402
from talkative.nla.train.data import ActivationSet  # noqa: E402
from talkative.nla.train.targets import context_tail, sentence_rows  # noqa: E402

# name -> form (quote: the tokens before the current one, ending the explanation), raw context of n tokens, or
# None for blank; run as listed
FORMS: dict[str, Form | int | None] = {
    "reading 6": Form(False, 6, 0),
    "genre + reading 6": Form(True, 6, 0),
    "genre + next 2 + reading 6": Form(True, 6, 2),
    "genre + next 2 + reading 4": Form(True, 4, 2),
    "next 2 + reading 6": Form(False, 6, 2),
    "reading 8": Form(False, 8, 0),
    "blank (spaces: the current token alone)": None,
    "raw context, 8 tokens (first demo)": 8,
    "genre": Form(True, 0, 0),
    "next 2": Form(False, 0, 2),
    "reading 2": Form(False, 2, 0),
    "reading 4": Form(False, 4, 0),
    "genre + next 1 + reading 8": Form(True, 8, 1),
}


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """Weights W ([d+1, d]) minimising |[x 1] W − y|² + lam |W|² (bias unpenalised enough at this size)."""
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    eye = torch.eye(x1.shape[1], dtype=x.dtype)
    return torch.linalg.solve(x1.T @ x1 + lam * eye, x1.T @ y)


def features(
    r: SoftPromptReconstructor, ids: torch.Tensor, cur: torch.Tensor, batch: int = 64
) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [r(ids[i : i + batch], cur[i : i + batch]) for i in range(0, len(ids), batch)]
        ).double()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data", nargs="+", required=True, help="dataset directories (their train/ splits are read)"
    )
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument(
        "--fit", type=float, default=0.75, help="fraction of the samples the ridge head is fitted on"
    )
    ap.add_argument("--t-text", type=int, default=24)
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--lam", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["float32", "bfloat16"],
        help="the frozen reader's weights (as trained)",
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--forms", nargs="+", choices=list(FORMS), help="measure only these forms (default: all)")
    args = ap.parse_args()

    data = ActivationSet([Path(d) / "train" for d in args.data])
    g = torch.Generator().manual_seed(args.seed)
    # whole documents on one side of the fit / score cut, so the head cannot memorise a document
    docs = torch.unique(data.doc_key)
    doc_order = docs[torch.randperm(len(docs), generator=g)]
    rank = {int(d): i for i, d in enumerate(doc_order.tolist())}
    order = sorted(range(len(data)), key=lambda i: (rank[int(data.doc_key[i])], i))
    keep = torch.tensor(order[: args.samples]) if len(order) > args.samples else torch.tensor(order)
    n_fit = int(len(keep) * args.fit)
    score = keep[n_fit:]
    model = next(
        (m["model"] for m in data.meta["datasets"] if m.get("model")), "bundled:smollm2-135m-instruct"
    )
    lm = load_lm(model, dtype=args.dtype, progress=False)
    nla = NLA.init(
        lm, args.layer, t_text=args.t_text, ar_prompt="Text:<text>", head="linear", objective="nmse"
    )
    r = nla.reconstructor
    assert isinstance(r, SoftPromptReconstructor)
    tok = lm.tokenizer
    variance = M.normalized_variance(data.acts)
    genres = data.genres()
    historical = {
        CORPUS_GENRES[c] for c in ("shakespeare", "milton", "kjv", "python-docs", "gcide", "fortunes")
    }
    modern_mask = torch.tensor([genres[i] not in historical for i in score.tolist()])
    kept_genres = [genres[i] for i in keep.tolist()]
    ctx, top = data.ctx[keep], data.top[keep]
    cur = data.current[keep]
    A = M.normalize(data.acts[keep]).double()
    rows = []
    started = time.monotonic()
    for name, form in FORMS.items():
        if args.forms and name not in args.forms:
            continue
        if form is None:
            ids = torch.full((len(keep), args.t_text), r.space_id, dtype=torch.long)
            lengths = torch.zeros(len(keep))
        elif isinstance(form, int):
            ids = context_tail(ctx, form, r.space_id)
            lengths = torch.full((len(keep),), float(form))
        else:
            ids = sentence_rows(tok, kept_genres, ctx, top, form, args.t_text, r.space_id)
            lengths = (ids != r.space_id).sum(1).float()
            texts = [tok.decode(row) for row in ids[:200].tolist()]
            unparsed = [t for t in texts if t.strip() and parse(t) is None]
            if unparsed:
                raise SystemExit(f"{name}: rendered targets that do not parse, e.g. {unparsed[0]!r}")
        X = features(r, ids, cur)
        W = ridge(X[:n_fit], A[:n_fit], args.lam)
        pred = torch.cat([X[n_fit:], torch.ones(len(score), 1, dtype=X.dtype)], 1) @ W
        n = M.nmse(A[n_fit:].float(), pred.float())
        fve = 1 - n / variance
        row = {
            "form": name,
            "fve": float(fve.mean()),
            "fve_se": float(fve.std() / len(fve) ** 0.5),
            "fve_modern": float(fve[modern_mask].mean()) if modern_mask.any() else None,
            "fve_historical": float(fve[~modern_mask].mean()) if (~modern_mask).any() else None,
            "tokens_mean": float(lengths.mean()),
            "tokens_max": int(lengths.max()),
            "example": tok.decode(ids[0].tolist()).rstrip(),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "data": args.data,
        "samples_fit": n_fit,
        "samples_scored": len(score),
        "scored_modern": int(modern_mask.sum()),
        "t_text": args.t_text,
        "layer": args.layer,
        "ridge_lambda": args.lam,
        "dtype": args.dtype,
        "variance": variance,
        "seconds": round(time.monotonic() - started, 1),
        "forms": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "| explanation given to the frozen reconstructor | FVE (± se) | modern | historical | tokens (mean / max) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        fm = "–" if row["fve_modern"] is None else f"{row['fve_modern']:.3f}"
        fh = "–" if row["fve_historical"] is None else f"{row['fve_historical']:.3f}"
        lines.append(
            f"| {row['form']} | {row['fve']:.3f} ± {row['fve_se']:.3f} | {fm} | {fh} | {row['tokens_mean']:.1f} / {row['tokens_max']} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
