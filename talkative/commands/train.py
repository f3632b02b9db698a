"""`talkative train STAGE --config FILE [--resume]` for STAGE in ar-sft, av-sft, grpo; plus `data`, `chats` and
`modern`.

`talkative train data --config data.yaml --out DIR` extracts an activation dataset; `talkative train chats --out
FILE` writes chat transcripts by the subject model; `talkative train modern --out FILE` has it write documents in
twelve modern genres (resumable). Every stage checkpoints every few minutes and resumes exactly
with `--resume`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

ACTIONS = ("ar-sft", "av-sft", "grpo", "data", "chats", "modern")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=ACTIONS)
    p.add_argument("--config", type=Path, help="YAML or JSON config (defaults apply to missing keys)")
    p.add_argument("--out", help="run directory (stages), dataset directory (data) or JSONL file (chats)")
    p.add_argument("--data", help="dataset directory (overrides the config)")
    p.add_argument("--init", help="start from this native checkpoint (overrides the config)")
    p.add_argument("--steps", type=int, help="total steps (overrides the config)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument(
        "--checkpoint-every", type=int, help="checkpoint every N steps instead of every few minutes"
    )
    p.add_argument(
        "--limit", type=int, help="modern: write at most this many documents in this run (resumable later)"
    )
    p.add_argument("--batch", type=int, default=8, help="modern: documents generated together")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.stage == "data":
        return _data(args)
    if args.stage == "chats":
        return _chats(args)
    if args.stage == "modern":
        return _modern(args)
    from ..nla.train.config import load_config
    from ..nla.train.data import DatasetMismatch
    from ..nla.train.loop import Run
    from ..nla.train.stages import train

    cfg = load_config(
        args.config, stage=args.stage, out=args.out, data=args.data, init=args.init, steps=args.steps
    )
    try:
        run_ = Run(cfg, resume=args.resume, checkpoint_every=args.checkpoint_every)
    except DatasetMismatch as exc:  # data of another subject or layer than the NLA
        raise SystemExit(f"talkative train {args.stage}: {exc}") from None
    path = train(run_, progress=not args.no_progress)
    print(f"checkpoint: {path}")
    return 0


def _data(args: argparse.Namespace) -> int:
    from ..nla.lm import load_lm
    from ..nla.train.data import DataConfig, DatasetMismatch, build_dataset

    raw: dict[str, Any] = {}
    if args.config:
        text = args.config.read_text()
        raw = (json.loads(text) if args.config.suffix == ".json" else yaml.safe_load(text)) or {}
    known = {f.name for f in fields(DataConfig)}
    unknown = sorted(set(raw) - known - {"out"})
    if unknown:
        raise SystemExit(f"unknown data config keys: {unknown}; known: {sorted(known)}")
    out = Path(args.out or raw.pop("out", "data/activations"))
    raw.pop("out", None)
    cfg = DataConfig(**raw)
    lm = load_lm(cfg.source, dtype=cfg.dtype, progress=not args.no_progress)
    try:
        meta = build_dataset(cfg, lm, out, progress=not args.no_progress)
    except DatasetMismatch as exc:  # chunks of another plan in the output directory
        raise SystemExit(f"talkative train data: {exc}") from None
    print(
        json.dumps(
            {"out": str(out), "counts": meta["counts"], "train_variance": meta.get("train_variance")},
            indent=2,
        )
    )
    return 0


def _chats(args: argparse.Namespace) -> int:
    from ..nla.lm import load_lm
    from ..nla.sources import DEFAULT_SOURCE
    from ..nla.train.chats import write_chats

    lm = load_lm(DEFAULT_SOURCE, dtype="bfloat16", progress=not args.no_progress)
    n = write_chats(lm, Path(args.out or "data/chats.jsonl"))
    print(f"{n} transcripts written")
    return 0


def _modern(args: argparse.Namespace) -> int:
    from ..nla.lm import load_lm
    from ..nla.sources import DEFAULT_SOURCE
    from ..nla.train.modern import write_modern

    lm = load_lm(DEFAULT_SOURCE, dtype="bfloat16", progress=not args.no_progress)
    out = Path(args.out or "data/modern.jsonl")
    n = write_modern(lm, out, batch=args.batch, limit=args.limit, progress=not args.no_progress)
    print(f"{n} documents written to {out}")
    return 0
