"""Interactive latency with a large batch running: does a batch really yield to interactive requests?

It starts its own server process on the repository's model_groups.json (the bundled SmolLM2) with the server's
default settings, then, in the same run and with the same request:

1. measures a short interactive analysis alone (`POST /analyze`, then `GET /status` until completed), --repeats
   times after one warm-up;
2. submits a large batch (`POST /api/v1/batches`, --items texts of --words words, the same options), waits until
   its items are running, and measures the same interactive analysis again, --repeats times, while the batch runs
   (a measurement taken after the batch ended would not count: the run says so and fails);
3. cancels the batch and stops the server.

Printed: the median (and each) latency alone and with the batch, their ratio (the target is at most 3×), and the
batch's own throughput meanwhile (positions per second). Exit status 1 when the ratio is above --target.

Usage: python bench/batch_latency.py [--repeats 5] [--items 300] [--words 40] [--target 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _server_process import ServerProcess

REPO = Path(__file__).resolve().parents[1]
TEXT = "The capital of France is Paris."
#: the interactive request and every batch item: light analyses (the question is scheduling, not the engine)
OPTIONS: dict[str, Any] = {
    "optimize_explanations_config": {"best_of_k": 2},
    "calculate_token_salience": False,
    "no_kl": True,
}


def interactive(client: httpx.Client, seed: int) -> float:
    """Seconds from submitting the short analysis to reading its completed result. Each request has its own seed,
    so the result cache can never answer it: both conditions measure computed work."""
    t0 = time.perf_counter()
    r = client.post("/analyze", json={"text": TEXT, "options": {**OPTIONS, "seed": seed}})
    r.raise_for_status()
    request_id = r.json()["request_id"]
    while True:
        body = client.get(f"/status/{request_id}").json()
        if body["status"] == "completed":
            return time.perf_counter() - t0
        if body["status"] in ("failed", "cancelled"):
            raise SystemExit(f"the interactive request {body['status']}: {body['error']}")
        time.sleep(0.02)


def batch_items(n: int, words: int) -> list[dict[str, Any]]:
    vocabulary = [
        "river",
        "stone",
        "market",
        "violin",
        "winter",
        "garden",
        "ocean",
        "letter",
        "engine",
        "forest",
    ]
    return [
        {"id": i, "text": " ".join(vocabulary[(i + j) % len(vocabulary)] for j in range(words)) + "."}
        for i in range(n)
    ]


def progress(client: httpx.Client, batch_id: str) -> dict[str, Any]:
    body: dict[str, Any] = client.get(f"/api/v1/batches/{batch_id}").json()
    return body


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="interactive requests measured per condition")
    ap.add_argument("--items", type=int, default=300, help="items of the batch (enough to outlast the run)")
    ap.add_argument("--words", type=int, default=40, help="words per batch item")
    ap.add_argument("--target", type=float, default=3.0, help="the largest acceptable ratio")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="talkative-batch-latency-") as tmp:
        workdir = Path(tmp)
        server = ServerProcess(
            workdir,
            {
                "DATA_DIR": str(workdir / "data"),
                "MODEL_GROUPS_FILE": str(REPO / "model_groups.json"),
                "RESULT_CACHE": "false",  # every request computed (its own seed makes sure of it as well)
            },
        )
        try:
            server.wait_ready()
            with httpx.Client(base_url=server.url, timeout=600) as client:
                interactive(client, seed=0)  # warm-up: first-call costs are nobody's latency
                alone = [interactive(client, seed=1 + i) for i in range(args.repeats)]
                r = client.post(
                    "/api/v1/batches", json={"items": batch_items(args.items, args.words), "options": OPTIONS}
                )
                r.raise_for_status()
                batch_id = r.json()["batch_id"]
                while (p := progress(client, batch_id))["items"]["done"] < 1:
                    time.sleep(0.1)
                before = p
                with_batch = [interactive(client, seed=1001 + i) for i in range(args.repeats)]
                after = progress(client, batch_id)
                if after["status"] != "running":
                    raise SystemExit(
                        f"the batch ended ({after['status']}) during the measurement: raise --items"
                    )
                client.post(f"/api/v1/batches/{batch_id}/cancel")
        finally:
            server.stop()

    median_alone, median_with = statistics.median(alone), statistics.median(with_batch)
    ratio = median_with / median_alone
    done = after["items"]["done"] - before["items"]["done"]
    figures = {
        "alone_seconds": alone,
        "with_batch_seconds": with_batch,
        "median_alone": round(median_alone, 3),
        "median_with_batch": round(median_with, 3),
        "ratio": round(ratio, 2),
        "batch_items_done_meanwhile": done,
        "batch_positions_per_second": after["positions_per_second"],
    }
    print(
        f"interactive latency alone:        median {median_alone:.3f} s  ({', '.join(f'{x:.3f}' for x in alone)})"
    )
    print(
        f"interactive latency with a batch: median {median_with:.3f} s  ({', '.join(f'{x:.3f}' for x in with_batch)})"
    )
    print(f"ratio: {ratio:.2f}x (target <= {args.target:g}x)")
    print(f"the batch meanwhile: {done} items done, {after['positions_per_second']} positions/s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if ratio <= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
