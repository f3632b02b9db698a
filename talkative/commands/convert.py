"""`talkative convert SRC --to native|upstream OUT`: rewrite a checkpoint in another format.

* upstream `.pt` (or run directory) → native: the trained tensors under our names, `nla.json` naming the base;
* official AV/AR pair → native: `OUT/av` and `OUT/ar` (hard links by default) referenced from `nla.json`;
* native (upstream architecture) → upstream `.pt`: what the upstream reader loads, tensors bit-for-bit;
* upstream → upstream: a clean copy without optimizer state.

Conversion loads the models the checkpoint names (their tokenizers size the prompts), so every shape is checked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src", type=Path, help="checkpoint: native dir, upstream .pt / run dir, official AV/AR pair"
    )
    from ..nla.formats import writable

    p.add_argument("--to", required=True, choices=writable(), help="target format")
    p.add_argument("out", type=Path, help="output directory (native) or .pt file / run directory (upstream)")
    p.add_argument("--subject", help="model whose activations are explained, replacing the one SRC names")
    p.add_argument("--base", help="upstream SRC: local path (or source) of the base model it names")
    p.add_argument(
        "--link",
        choices=["hard", "symlink", "copy"],
        default="hard",
        help="official SRC: how the AV/AR model directories go into OUT (default: hard links)",
    )
    p.add_argument("--fve-variance", type=float, help="FVE baseline Var(v_nrm) to record")
    p.add_argument(
        "--trust-checkpoint", action="store_true", help="allow unpickling an upstream .pt that needs it"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype models load in")


def convert(
    src: Path,
    to: str,
    out: Path,
    *,
    subject: str | None = None,
    base: str | None = None,
    link: str = "hard",
    fve_variance: float | None = None,
    trust_checkpoint: bool = False,
    dtype: str = "float32",
) -> Path:
    from ..nla.checkpoint import CheckpointError, load_nla
    from ..nla.formats import FORMATS, format_of, named
    from ..nla.lm import LMPool

    source, target = format_of(src), named(to)
    if target.save is None:
        raise CheckpointError(f"Talkative does not write {to} checkpoints")
    kwargs: dict[str, Any] = {}
    if fve_variance is not None:
        kwargs["fve_variance"] = fve_variance
    if base is not None:
        if not source.base_by_id:
            takers = ", ".join(f.name for f in FORMATS if f.base_by_id)
            raise CheckpointError(f"--base applies to {takers} checkpoints (the others name their own bases)")
        kwargs["base_override"] = base
    nla = load_nla(
        src,
        pool=LMPool(dtype=dtype),
        subject_override=subject,
        trust_checkpoint=trust_checkpoint,
        **kwargs,
    )
    nla.provenance = {**nla.provenance, "converted_from": {"format": source.name, "path": str(src.resolve())}}
    if target.holds_bases:
        if out.exists() and out.resolve() == Path(src).resolve():
            raise CheckpointError("OUT must differ from SRC")
        if source.carry_bases is not None:
            source.carry_bases(nla, out, link)
    return target.save(nla, out)


def run(args: argparse.Namespace) -> int:
    from ..nla.checkpoint import CheckpointError
    from ..nla.sources import ModelSourceError

    try:
        path = convert(
            args.src,
            args.to,
            args.out,
            subject=args.subject,
            base=args.base,
            link=args.link,
            fve_variance=args.fve_variance,
            trust_checkpoint=args.trust_checkpoint,
            dtype=args.dtype,
        )
    except (CheckpointError, ModelSourceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
