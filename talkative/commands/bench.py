"""`talkative bench NAME [ARGS...]`: run one of the checkout's benchmarks (bench/NAME.py) with this interpreter.

The benchmarks are scripts, not package modules, because they compare the engine against code written outside it
(upstream's algorithm, a plain matmul) and must stay runnable with `python bench/NAME.py`; this command only
finds them and passes the remaining arguments through, so both spellings measure exactly the same thing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from ..defaults import repo_root


def bench_dir() -> Path:
    return repo_root() / "bench"


def available() -> list[str]:
    directory = bench_dir()
    # modules whose name starts with "_" are shared by the benchmarks, not benchmarks
    return (
        sorted(p.stem for p in directory.glob("*.py") if not p.stem.startswith("_"))
        if directory.is_dir()
        else []
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help=f"benchmark to run ({', '.join(available()) or 'none found'})")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see NAME --help)")


def run(args: argparse.Namespace) -> int:
    names = available()
    if not args.name:
        print("benchmarks: " + (", ".join(names) or f"none (no {bench_dir()})"))
        return 0
    if args.name not in names:
        print(
            f"error: no benchmark {args.name!r} in {bench_dir()}; available: {', '.join(names) or 'none'}",
            file=sys.stderr,
        )
        return 2
    script = bench_dir() / f"{args.name}.py"
    return subprocess.call([sys.executable, str(script), *args.args])
