"""Server benchmark: cross-request batching and interleaving, measured over real WebSockets.

It starts its own server process on the repository's model_groups.json (the bundled SmolLM2), then measures

(a) throughput: N clients sending short texts at once, against the same requests sent one after another, in the
    same run: aggregate positions per second and their ratio (target >= 1.5x);
(b) latency: a ~10-token request submitted while a ~1,000-token request is being explained, against its latency
    alone (target <= 3x). The long request is cancelled once the measurement is done.

Usage: python bench/serve.py [--clients 8] [--best-of-k 4] [--repeats 2] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import websockets
from _server_process import ServerProcess
from _texts import SHORT_TEXTS

REPO = Path(__file__).resolve().parents[1]

TEN_TOKENS = "The quick brown fox jumps over the lazy dog."
LONG_SENTENCES = [
    "The history of the city goes back more than two thousand years.",
    "Merchants brought spices, silk and new ideas along the river.",
    "In the winter the streets were quiet and covered in snow.",
    "Scientists at the university studied the stars and the tides.",
    "Every spring a festival filled the squares with music and food.",
]


def long_text(sentences: int) -> str:
    return " ".join(LONG_SENTENCES[i % len(LONG_SENTENCES)] for i in range(sentences))


async def run_one(url: str, text: str, options: dict[str, Any]) -> tuple[float, int]:
    """Submit one analysis on its own connection; (seconds from send to result, positions)."""
    async with websockets.connect(url, max_size=None) as ws:
        t0 = time.perf_counter()
        await ws.send(json.dumps({"type": "analyze", "text": text, "options": options}))
        while True:
            msg = json.loads(await ws.recv())
            if msg["type"] == "result":
                return time.perf_counter() - t0, len(msg["tokens"])
            if msg["type"] == "error":
                raise RuntimeError(msg["error"])


async def throughput(url: str, texts: list[str], options: dict[str, Any]) -> dict[str, float]:
    t0 = time.perf_counter()
    positions = 0
    for text in texts:
        positions += (await run_one(url, text, options))[1]
    sequential = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = await asyncio.gather(*(run_one(url, text, options) for text in texts))
    concurrent = time.perf_counter() - t0
    conc_positions = sum(n for _, n in results)
    return {
        "positions": positions,
        "sequential_seconds": sequential,
        "concurrent_seconds": concurrent,
        "sequential_positions_per_s": positions / sequential,
        "concurrent_positions_per_s": conc_positions / concurrent,
    }


async def latency_under_load(
    url: str, options: dict[str, Any], sentences: int, samples: int
) -> dict[str, Any]:
    alone = [(await run_one(url, TEN_TOKENS, options))[0] for _ in range(samples)]
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "analyze", "text": long_text(sentences), "options": options}))
        long_id, total = None, None
        while total is None:  # wait until the long request is being explained, chunk by chunk
            msg = json.loads(await ws.recv())
            if msg["type"] == "queued":
                long_id = msg["request_id"]
            elif msg["type"] == "processing" and msg.get("stage") == "explanation_generation":
                total = msg["total_positions"]
            elif msg["type"] in ("error", "result"):
                raise RuntimeError(f"the long request ended early: {msg}")
        progress: list[int] = []

        async def follow() -> None:  # keep reading the long request's messages (and answering pings)
            async for raw in ws:
                msg = json.loads(raw)
                if msg["type"] == "processing":
                    progress.append(msg["done_positions"])

        reader = asyncio.create_task(follow())
        loaded = [(await run_one(url, TEN_TOKENS, options))[0] for _ in range(samples)]
        await ws.send(json.dumps({"type": "cancel_request", "request_id": long_id}))
        reader.cancel()
        if progress and progress[-1] >= total:
            raise RuntimeError(
                "the long request finished before the measurement did; use more --long-sentences"
            )
    return {
        "long_positions": total,
        "alone_seconds": alone,
        "under_load_seconds": loaded,
        "alone_median": statistics.median(alone),
        "under_load_median": statistics.median(loaded),
    }


async def main_async(args: argparse.Namespace, url: str) -> dict[str, Any]:
    options = {"optimize_explanations_config": {"best_of_k": args.best_of_k}}
    texts = SHORT_TEXTS[: args.clients]
    await run_one(url, "Warm up the model.", options)
    rounds = []
    for r in range(args.repeats):
        rounds.append(await throughput(url, texts, options))
        print(
            f"(a) round {r + 1}: sequential {rounds[-1]['sequential_positions_per_s']:.2f} pos/s, "
            f"concurrent {rounds[-1]['concurrent_positions_per_s']:.2f} pos/s "
            f"({rounds[-1]['concurrent_positions_per_s'] / rounds[-1]['sequential_positions_per_s']:.2f}x)",
            flush=True,
        )
    seq = statistics.median(x["sequential_positions_per_s"] for x in rounds)
    conc = statistics.median(x["concurrent_positions_per_s"] for x in rounds)
    # each round's two figures are taken back to back, so their ratio is steadier than a ratio of medians
    ratio = statistics.median(
        x["concurrent_positions_per_s"] / x["sequential_positions_per_s"] for x in rounds
    )
    lat = await latency_under_load(url, options, args.long_sentences, args.samples)
    return {
        "options": options,
        "clients": args.clients,
        "throughput_rounds": rounds,
        "sequential_positions_per_s": seq,
        "concurrent_positions_per_s": conc,
        "throughput_ratio": ratio,
        "latency": lat,
        "latency_ratio": lat["under_load_median"] / lat["alone_median"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--best-of-k", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="throughput rounds (median reported)")
    p.add_argument("--samples", type=int, default=3, help="latency samples each way (median reported)")
    p.add_argument(
        "--long-sentences", type=int, default=80, help="sentences in the long text (~13 tokens each)"
    )
    p.add_argument("--workers", type=int, default=1, help="NUM_WORKERS_PER_GPU of the server")
    p.add_argument("--row-budget", type=int, help="GLOBAL_AUTO_BATCH_SIZE_MAX (default: the JSON's)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="talkative-bench-") as tmp:
        env = {
            "DATA_DIR": str(Path(tmp) / "data"),
            "MODEL_GROUPS_FILE": str(REPO / "model_groups.json"),
            "REQUEST_TIMEOUT": "0",
            "MAX_ACTIVE_JOBS": str(max(args.clients, 8)),
            "NUM_WORKERS_PER_GPU": str(args.workers),
            "LOG_LEVEL": "warning",
            # the same texts go sequentially, then concurrently: without this the second phase would be answered
            # from the result cache and measure a lookup, not batching
            "RESULT_CACHE": "false",
        }
        if args.row_budget:
            env["GLOBAL_AUTO_BATCH_SIZE_MAX"] = str(args.row_budget)
        server = ServerProcess(Path(tmp), env)
        try:
            server.wait_ready()
            t0 = time.time()
            out = asyncio.run(main_async(args, server.ws_url))
            out["wall_seconds"] = time.time() - t0
        finally:
            server.stop()
    lat = out["latency"]
    print(
        f"(a) {args.clients} concurrent clients: {out['concurrent_positions_per_s']:.2f} positions/s; "
        f"one after another: {out['sequential_positions_per_s']:.2f} positions/s (medians of {args.repeats} "
        f"rounds); ratio {out['throughput_ratio']:.2f}x (median of the rounds' ratios; target >= 1.5x)"
    )
    print(
        f"(b) 10-token request: {lat['alone_median']:.2f}s alone, {lat['under_load_median']:.2f}s while a "
        f"{lat['long_positions']}-token request runs; ratio {out['latency_ratio']:.2f}x (target <= 3x)"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
