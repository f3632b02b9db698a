"""`talkative eval CHECKPOINT --data HELDOUT`: FVE, nMSE, MSE, relative RMSE and KL on held-out activations,
against the untrained init and the blanked-explanation baseline, with best-of-k scaling (table + PNG)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="held-out activation directory (with shard-*.safetensors)")
    p.add_argument(
        "--out",
        type=Path,
        help="write eval.json, eval.md and best_of_k.png here (default: beside the checkpoint)",
    )
    p.add_argument("-n", "--samples", type=int, default=512)
    p.add_argument("--kl-samples", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--no-untrained", action="store_true", help="skip the untrained-init baseline")


def run(args: argparse.Namespace) -> int:
    from ..nla.checkpoint import NLA
    from ..nla.lm import LMPool
    from ..nla.loading import open_nla
    from ..nla.train.data import ActivationSet
    from ..nla.train.evaluate import evaluate, write_report

    pool = LMPool(dtype=args.dtype)
    nla = open_nla(args.checkpoint, pool=pool)
    data = ActivationSet(args.data)
    untrained = None
    if not args.no_untrained:
        cfg = nla.config()
        v, r = cfg["verbalizer"], cfg["reconstructor"]
        untrained = NLA.init(
            nla.subject,
            nla.layer,
            av_prompt=v["prompt"],
            patch_layers=v["patch_layers"],
            t_text=v["t_text"],
            ar_prompt=r["prompt"],
            output_layer=r["output_layer"],
            head=r["head"],
            objective=nla.objective,
            fve_variance=nla.fve_variance,
        )
    report = evaluate(
        nla,
        data,
        untrained=untrained,
        n=args.samples,
        kl_samples=args.kl_samples,
        seed=args.seed,
        temperature=args.temperature,
    )
    out = args.out or Path(args.checkpoint) / "eval"
    write_report(report, out, f"{nla.name}: layer {nla.layer} of {nla.subject_source}")
    print((out / "eval.md").read_text())
    print(json.dumps({"written": str(out)}))
    return 0
