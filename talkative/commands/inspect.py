"""`talkative inspect CHECKPOINT`: format, subject, layer, d_model, sizes, and a model-groups entry serving it.

Reads only the checkpoint's own files (configs, sidecars, tensor headers): no model is loaded, so it works for
checkpoints whose base models are not on this machine.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="native dir, upstream .pt / run dir, or official AV/AR pair")
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")
    p.add_argument(
        "--trust-checkpoint", action="store_true", help="allow unpickling an upstream .pt that needs it"
    )


def describe(path: Path, *, trust: bool = False) -> dict[str, Any]:
    """What the checkpoint's own format module says about it."""
    from ..nla.formats import format_of

    return format_of(path).describe(path, trust=trust)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "nla"


def model_group_entry(info: dict[str, Any], path: Path) -> dict[str, Any]:
    """A `model_groups.json` group with one model serving this checkpoint (the seed's schema)."""
    subject = str(info.get("subject") or "")
    base = (
        info.get("base") or subject
    )  # a format whose checkpoint names a base apart from its subject says so
    donor = subject if subject and subject != base else None
    name = Path(subject).name if subject else "nla"
    gid = _slug(name)
    return {
        "group_id": gid,
        "group_name": name,
        "base_model_path": base,
        "description": f"{info['format']} checkpoint",
        "visible": True,
        "models": [
            {
                "id": f"{gid}-{_slug(path.stem if path.is_file() else path.name)}-l{info['layer']}",
                "name": f"{name} L{info['layer']} ({info['format']})",
                "checkpoint": str(path.resolve()),
                "different_activations_orig_path": donor,
                "layer": info["layer"],
                "description": "",
                "batch_size": 32,
                "auto_batch_size_max": 256,
            }
        ],
    }


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return str(n)


def run(args: argparse.Namespace) -> int:
    from ..nla.checkpoint import CheckpointError

    try:
        info = describe(args.checkpoint, trust=args.trust_checkpoint)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    entry = model_group_entry(info, args.checkpoint)
    if args.json:
        print(json.dumps({**info, "model_group": entry}, indent=2, default=str))
        return 0
    for key, value in info.items():
        if key == "tensors":
            continue
        if key.endswith("_bytes") and isinstance(value, int):
            value = f"{_human(value)} ({value} bytes)"
        print(f"{key:28s} {value}")
    tensors = info.get("tensors") or {}
    if tensors:
        print("tensors:")
        for key, shape in tensors.items():
            print(f"  {key:40s} {shape}")
    print("\nmodel-groups entry (model_groups.json → model_groups[]):")
    print(json.dumps(entry, indent=2))
    return 0
