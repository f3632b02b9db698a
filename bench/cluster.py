"""Cluster benchmark: what a second worker replica buys, and what the Ray path costs one request.

On the repository's model_groups.json (the bundled SmolLM2 and its demo NLA), each serving process limited to one
CPU thread (TORCH_THREADS=1: a replica is one core's worth of work, so two replicas can use two cores), it measures
in one run

(a) scale-out: the same batch of N analyses sent at once through Serve's proxy with the worker pool at 1 replica
    and at 2 replicas (one CPU each), alternately for `--rounds` rounds (the pool is redeployed in place between
    them): positions per second, the median ratio (target >= 1.7x), and how the results spread over the replicas.
    Each timed batch follows an untimed one, so every replica holds the model when it is timed;
(b) overhead: one short analysis at a time over Serve (BACKEND=ray, one worker replica) and to a `talkative serve`
    process of the local backend with the same thread limit, alternately (so a change in the machine's load hits
    both alike): median latencies and their ratio (target <= 1.2x).

Ray is started here on free ports without its dashboard, and shut down at the end; the result cache is off, so
every request is computed.

Usage: python bench/cluster.py [--requests 8] [--best-of-k 2] [--samples 7] [--rounds 2] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import websockets
from _server_process import ServerProcess
from _texts import SHORT_TEXTS

REPO = Path(__file__).resolve().parents[1]
SHORT = "The quick brown fox jumps over the lazy dog."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_one(url: str, text: str, options: dict[str, Any]) -> tuple[float, int, str | None]:
    """One analysis on its own WebSocket: (seconds from send to result, positions, the replica that ran it)."""
    async with websockets.connect(url, max_size=None, open_timeout=60) as ws:
        t0 = time.perf_counter()
        await ws.send(json.dumps({"type": "analyze", "text": text, "options": options}))
        while True:
            msg = json.loads(await ws.recv())
            if msg["type"] == "result":
                return time.perf_counter() - t0, len(msg["tokens"]), msg["metadata"].get("replica")
            if msg["type"] == "error":
                raise RuntimeError(msg["error"])


async def batch(url: str, texts: list[str], options: dict[str, Any]) -> dict[str, Any]:
    """The batch sent at once: seconds until the last result, positions, results per replica."""
    t0 = time.perf_counter()
    done = await asyncio.gather(*(run_one(url, t, options) for t in texts))
    seconds = time.perf_counter() - t0
    positions = sum(n for _, n, _ in done)
    spread: dict[str, int] = {}
    for _, _, replica in done:
        spread[str(replica)] = spread.get(str(replica), 0) + 1
    return {"seconds": seconds, "positions": positions, "pos_per_s": positions / seconds, "spread": spread}


async def alternate(local: str, ray: str, options: dict[str, Any], samples: int) -> dict[str, list[float]]:
    """One short request to each server in turn, after a warm-up of each."""
    await run_one(local, "Warm up the model.", options)
    await run_one(ray, "Warm up the model.", options)
    out: dict[str, list[float]] = {"local": [], "ray": []}
    for _ in range(samples):
        out["local"].append((await run_one(local, SHORT, options))[0])
        out["ray"].append((await run_one(ray, SHORT, options))[0])
    return out


def groups_file(workdir: Path, replicas: int, max_ongoing: int) -> Path:
    """The repository's catalogue with the default group in a pool of `replicas` one-CPU replicas."""
    data = json.loads((REPO / "model_groups.json").read_text())
    default = data["settings"]["default_group"]
    for entry in data["model_groups"]:
        if entry["group_id"] == default:
            entry.update({"replicas": replicas, "num_cpus": 1, "max_ongoing_requests": max_ongoing})
    path = workdir / f"model_groups-{replicas}.json"
    path.write_text(json.dumps(data))
    return path


def wait_ready(url: str, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the cluster was not ready after {timeout:.0f} s")


def measure(workdir: Path, args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    import ray
    from ray import serve

    from talkative.serve.cluster.deploy import deploy
    from talkative.serve.settings import Settings

    port = free_port()
    url, ws_url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/ws"
    texts = (SHORT_TEXTS * ((args.requests + len(SHORT_TEXTS) - 1) // len(SHORT_TEXTS)))[: args.requests]
    local = ServerProcess(
        workdir, {"TORCH_THREADS": "1", "RESULT_CACHE": "false", "DATA_DIR": str(workdir / "local-data")}
    )
    out: dict[str, Any] = {"rounds": []}
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:

        def pool_of(replicas: int) -> None:
            settings = Settings(
                model_groups_file=groups_file(workdir, replicas, args.max_ongoing),
                data_dir=workdir / "ray-data",
                result_cache=False,
                torch_threads=1,
                _env_file=None,
            )
            deploy(settings, port=port)
            wait_ready(url)

        pool_of(1)
        local.wait_ready()
        out["latency"] = asyncio.run(alternate(local.ws_url, ws_url, options, args.samples))
        local.stop()
        print(
            f"(b) one request: local {statistics.median(out['latency']['local']):.3f} s, Ray "
            f"{statistics.median(out['latency']['ray']):.3f} s (medians of {args.samples})",
            flush=True,
        )
        for _ in range(args.rounds):
            for replicas in (1, 2):
                pool_of(replicas)
                asyncio.run(batch(ws_url, texts, options))  # every replica holds the model before it is timed
                timed = asyncio.run(batch(ws_url, texts, options))
                out["rounds"].append({"replicas": replicas, **timed})
                print(
                    f"(a) {replicas} worker replica(s): {timed['positions']} positions in {timed['seconds']:.1f} s"
                    f" = {timed['pos_per_s']:.2f} positions/s; results per replica {sorted(timed['spread'].values())}",
                    flush=True,
                )
    finally:
        if local.proc.poll() is None:
            local.stop()
        serve.shutdown()
        ray.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=8, help="analyses in the batch of (a)")
    parser.add_argument("--best-of-k", type=int, default=2)
    parser.add_argument(
        "--samples", type=int, default=7, help="requests timed one at a time per server in (b)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="timed batches at 1 and at 2 replicas in (a)")
    parser.add_argument("--max-ongoing", type=int, default=4, help="jobs one worker replica holds at once")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    options = {"optimize_explanations_config": {"best_of_k": args.best_of_k}}
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="talkative-bench-cluster-") as tmp:
        out = measure(Path(tmp), args, options)
    one = [r["pos_per_s"] for r in out["rounds"] if r["replicas"] == 1]
    two = [r["pos_per_s"] for r in out["rounds"] if r["replicas"] == 2]
    scale = statistics.median(two) / statistics.median(one)
    best = max(two) / max(one)  # the least disturbed round of each: the machine's other load only ever slows
    overhead = statistics.median(out["latency"]["ray"]) / statistics.median(out["latency"]["local"])
    print(
        f"(a) throughput ratio, 2 replicas / 1: {scale:.2f}x of the medians, {best:.2f}x of the best rounds (target >= 1.7x)"
    )
    print(f"(b) latency ratio, Ray / local: {overhead:.2f}x (target <= 1.2x)")
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} before and {os.getloadavg()[0]:.1f} after; "
        f"requests {args.requests}, best_of_k {args.best_of_k}"
    )
    if args.json:
        result = {
            **out,
            "throughput_ratio": scale,
            "throughput_ratio_best": best,
            "latency_ratio": overhead,
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
