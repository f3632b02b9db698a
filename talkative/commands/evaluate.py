"""`talkative eval CHECKPOINT --data HELDOUT`: FVE, nMSE, MSE, relative RMSE and KL on held-out activations,
with best-of-k scaling, against baselines at equal k: the mean training activation of the current token, the
selection control (best of k over explanations of other documents' activations) and the untrained init.

The data must come from the checkpoint's subject at its layer (refused otherwise); a training split is accepted
only with `--allow-train`, and the report then says `train` everywhere it says held-out otherwise."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="held-out activation directory (with shard-*.safetensors)")
    p.add_argument(
        "--train-data",
        help="training split for the token-mean baseline (default: the dataset's train/ beside --data, if any)",
    )
    p.add_argument(
        "--allow-train",
        action="store_true",
        help="accept a training split as --data (the report is labelled train, not held-out)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="write eval.json, eval.md and best_of_k.png here (default: beside the checkpoint)",
    )
    p.add_argument("-n", "--samples", type=int, default=512)
    p.add_argument("--kl-samples", type=int, default=128)
    p.add_argument(
        "--max-k",
        type=int,
        default=16,
        choices=[1, 2, 4, 8, 16],
        help="largest best-of-k (k = 1, 2, ... max-k)",
    )
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
    try:
        data = ActivationSet(args.data)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"talkative eval: {exc}") from None
    if data.split != "heldout" and not args.allow_train:
        raise SystemExit(
            f"{args.data} is not a held-out split ({data.split}); pass --allow-train to evaluate on it anyway, "
            "labelled as such"
        )
    train_dir = Path(args.train_data) if args.train_data else Path(args.data).parent / "train"
    train = ActivationSet(train_dir) if any(train_dir.glob("shard-*.safetensors")) else None
    if args.train_data and train is None:
        raise SystemExit(f"no activation shards in {train_dir}")
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
    started = time.monotonic()
    try:
        report = evaluate(
            nla,
            data,
            train=train,
            untrained=untrained,
            n=args.samples,
            kl_samples=args.kl_samples,
            seed=args.seed,
            temperature=args.temperature,
            ks=tuple(k for k in (1, 2, 4, 8, 16) if k <= args.max_k),
        )
    except ValueError as exc:  # wrong subject or layer, a context too short for KL, too few documents
        raise SystemExit(f"talkative eval: {exc}") from None
    report["seconds"] = round(time.monotonic() - started, 1)
    out = args.out or Path(args.checkpoint) / "eval"
    write_report(report, out, f"{nla.name}: layer {nla.layer} of {nla.subject_source}")
    print((out / "eval.md").read_text())
    print(json.dumps({"written": str(out)}))
    return 0
