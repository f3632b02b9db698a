"""Batch invariance of sampling: do the same seed and position give the same explanation whatever the batch?

The server merges positions of several requests into one engine batch, and the row budget decides how many
positions of one request share a batch, so a position's explanation must not depend on either. Floating-point
reductions do depend on the batch shape (logits move by ~1e-5 between a batch of 1 and one of 32), so this
benchmark measures how often such shifts change what is sampled.

On the bundled SmolLM2 NLA (the demo checkpoint, or `--untrained-layer L --t-text T` for an untrained `NLA.init`
with longer explanations) it analyses the same positions of one text, with the same seed, through the public
engine API (`prepare`, `run_batch`) in five arrangements:

* `bs1`, `bs8`, `bs32`: batches of 1, 8 and 32 positions of the text;
* `merged8+24`: batches of 8 positions of the text together with 24 positions of another text (as the server
  merges two requests);
* `merged32+rev`: batches of 32 positions with the other text's positions placed first.

For each dtype it counts the positions whose best explanation (best of k by the reconstructor's score, as the
server returns it) differs from `bs1`'s, and the positions whose best explanation is not the same in all five.

Usage: python bench/sampling_invariance.py [--dtypes fp32,bf16] [--positions 50] [-k 4] [--temperature 1.0]
       [--untrained-layer 20 --t-text 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analyze import TEXT as BENCH_TEXT  # noqa: E402  (bench/analyze.py: the engine benchmark's text and NLA)
from analyze import open_bench_nla  # noqa: E402

from talkative.nla.analysis import Prepared, prepare, run_batch  # noqa: E402
from talkative.nla.checkpoint import NLA  # noqa: E402
from talkative.nla.options import resolve  # noqa: E402

# The engine benchmark's text, made longer so 50 positions fit.
TEXT = (
    BENCH_TEXT + " In winter the storms came early, and he would sit by the window "
    "until the light had turned twice around the bay, listening to the wind and writing down what he heard."
)
OTHER = (
    "Quarterly revenue rose 12 percent to 4.1 billion dollars, driven by strong demand for cloud services, while "
    "operating costs grew more slowly than expected; the board approved a new buyback programme and raised the "
    "dividend for the third consecutive year, citing confidence in the long-term outlook."
)
SEED = 1234


def arrange(
    name: str, main: Prepared, other: Prepared, positions: list[int], fill: list[int]
) -> list[list[tuple[Prepared, list[int]]]]:
    """The engine batches of one arrangement, each a list of (prepared input, positions) parts."""
    if name.startswith("bs"):
        size = int(name[2:])
        return [[(main, positions[i : i + size])] for i in range(0, len(positions), size)]
    if name == "merged8+24":
        return [[(main, positions[i : i + 8]), (other, fill[:24])] for i in range(0, len(positions), 8)]
    if name == "merged32+rev":
        return [[(other, fill[:8]), (main, positions[i : i + 32])] for i in range(0, len(positions), 32)]
    raise ValueError(name)


ARRANGEMENTS = ("bs1", "bs8", "bs32", "merged8+24", "merged32+rev")


def run_arrangement(
    nla: NLA, batches: Sequence[Sequence[tuple[Prepared, list[int]]]], main: Prepared, opts: Any
) -> dict[int, str]:
    """The best explanation of every position of `main`."""
    best: dict[int, str] = {}
    for parts in batches:
        for (prep, pos), rows in zip(parts, run_batch(nla, list(parts), opts), strict=True):
            if prep is main:
                best.update((q, row["explanation"]) for q, row in zip(pos, rows, strict=True))
    return best


def measure(dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    nla, label = open_bench_nla(dtype, args.untrained_layer, args.t_text)
    opts = resolve(
        {
            "seed": SEED,
            "temperature": args.temperature,
            "no_kl": True,
            "calculate_token_salience": False,
            "optimize_explanations_config": {"best_of_k": args.k},
        }
    )
    main = prepare(nla, TEXT, options=opts)
    other = prepare(nla, OTHER, options=opts)
    positions = main.positions[: args.positions]
    fill = other.positions[:24]
    runs: dict[str, dict[int, str]] = {}
    seconds: dict[str, float] = {}
    for name in ARRANGEMENTS:
        t0 = time.perf_counter()
        runs[name] = run_arrangement(nla, arrange(name, main, other, positions, fill), main, opts)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"{dtype} {name}: {seconds[name]} s", file=sys.stderr, flush=True)
    ref = runs["bs1"]
    vs_bs1 = {name: sum(runs[name][q] != ref[q] for q in positions) for name in ARRANGEMENTS[1:]}
    unstable = sum(len({runs[n][q] for n in ARRANGEMENTS}) > 1 for q in positions)
    return {
        "dtype": dtype,
        "nla": label,
        "positions": len(positions),
        "k": args.k,
        "temperature": args.temperature,
        "vs_bs1": vs_bs1,
        "positions_differing_across_any_arrangement": unstable,
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--positions", type=int, default=50)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--untrained-layer", type=int, default=None)
    ap.add_argument("--t-text", type=int, default=8, help="explanation length of the untrained NLA")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    dtypes = {"fp32": "float32", "bf16": "bfloat16"}
    results = []
    for d in args.dtypes.split(","):
        r = measure(dtypes[d.strip()], args)
        r["dtype"] = d.strip()
        results.append(r)
        print(json.dumps(r), flush=True)
    print()
    print("| dtype | positions × k | " + " | ".join(f"{n} vs bs1" for n in ARRANGEMENTS[1:]) + " | any two |")
    print("|---|---|" + "---|" * len(ARRANGEMENTS))
    for r in results:
        cells = [str(v) for v in r["vs_bs1"].values()]
        print(
            f"| {r['dtype']} | {r['positions']} × {r['k']} | "
            + " | ".join(cells)
            + f" | {r['positions_differing_across_any_arrangement']} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
