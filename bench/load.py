"""Load test: many concurrent clients against one server for a fixed time; nothing accepted may be lost.

It starts its own server process on the repository's model_groups.json (the bundled SmolLM2) with one API key
per client (so every client has its own rate limit and per-client cap, as on a shared deployment), the
server's default limits otherwise. Each client loops until the time is up: it submits a short analysis (half of
the clients over REST, polling `GET /status` every 2 s; the other half over a WebSocket of their own, waiting
for the `result`), and when refused (429, 503) waits as `Retry-After` says and tries again. When the time is up
nobody submits any more; every job already accepted is then waited for (at most --drain-timeout seconds), and
its final state is read back from `GET /status`.

Reported: accepted, rejected submissions by status and kind (and refused status polls), completed, failed,
lost (accepted but never finished or unknown to the server: must be 0), 5xx answers (must be 0), latency
percentiles (submission to result, of completed jobs) and the submission answer time. Bounded in count and
time (--clients, --duration, --drain-timeout) and to loopback (--url must point at this machine).

Usage: python bench/load.py [--clients 200] [--duration 60] [--drain-timeout 600] [--url http://127.0.0.1:8000]
       [--keys NAME:KEY,...] [--options JSON] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ipaddress
import json
import secrets
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import websockets
from _server_process import ServerProcess

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "The capital of France is Paris.",
    "Dogs are loyal and friendly animals.",
    "Water boils at one hundred degrees.",
    "She plays the violin every evening.",
    "The stock market fell sharply today.",
    "Photosynthesis turns light into sugar.",
    "He forgot his umbrella on the train.",
    "Bees communicate by dancing in the hive.",
]
#: light analyses: the test is about the server under load, not about engine throughput
DEFAULT_OPTIONS: dict[str, Any] = {
    "optimize_explanations_config": {"best_of_k": 2},
    "calculate_token_salience": False,
}
TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class Tally:
    """What every client saw; one per run, shared by the clients (one event loop, no locks needed)."""

    accepted: dict[str, float] = field(default_factory=dict)  # request id -> submission time
    owner: dict[str, str] = field(default_factory=dict)  # request id -> the key that may read it
    finished: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> (status, seen at)
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)  # submissions refused
    polls_refused: collections.Counter[str] = field(
        default_factory=collections.Counter
    )  # GET /status refused
    server_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    submit_seconds: list[float] = field(default_factory=list)
    transport_errors: collections.Counter[str] = field(default_factory=collections.Counter)

    def refusal(self, status: int, kind: str | None) -> None:
        self.rejected[f"{status} {kind or ''}".strip()] += 1
        if status >= 500 and status != 503:
            self.server_errors[str(status)] += 1


def loopback_only(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        raise SystemExit(f"cannot resolve {host!r}") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"refusing to load-test {url}: only this machine's loopback is allowed")


def start_server(keys: str, workdir: Path, env_extra: dict[str, str]) -> ServerProcess:
    env = {
        "DATA_DIR": str(workdir / "data"),
        "MODEL_GROUPS_FILE": str(REPO / "model_groups.json"),
        "API_KEYS": keys,
        "LOG_LEVEL": "warning",
        **env_extra,
    }
    server = ServerProcess(workdir, env)
    server.wait_ready()
    return server


def retry_after(headers: Any, fallback: float = 1.0) -> float:
    try:
        return max(0.5, float(headers.get("retry-after", fallback)))
    except (TypeError, ValueError):
        return fallback


async def rest_client(
    n: int, url: str, key: str, options: dict[str, Any], stop: float, drain_until: float, tally: Tally
) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        i = 0
        while time.time() < stop:
            body = {"text": f"{TEXTS[(n + i) % len(TEXTS)]} ({n}.{i})", "options": options}
            t0 = time.time()
            try:
                r = await http.post("/analyze", json=body)
            except httpx.HTTPError as exc:
                tally.transport_errors[type(exc).__name__] += 1
                await asyncio.sleep(1)
                continue
            tally.submit_seconds.append(time.time() - t0)
            if r.status_code != 200:
                tally.refusal(r.status_code, _kind(r))
                await asyncio.sleep(min(retry_after(r.headers), max(0.0, stop - time.time())))
                continue
            rid = r.json()["request_id"]
            tally.accepted[rid] = t0
            tally.owner[rid] = key
            i += 1
            while time.time() < drain_until:  # after the deadline too: an accepted job is waited for
                await asyncio.sleep(2)
                try:
                    s = await http.get(f"/status/{rid}")
                except httpx.HTTPError as exc:
                    tally.transport_errors[type(exc).__name__] += 1
                    continue
                if s.status_code == 429:
                    tally.polls_refused[f"429 {_kind(s) or ''}".strip()] += 1
                    await asyncio.sleep(retry_after(s.headers))
                    continue
                if s.status_code >= 500:
                    tally.server_errors[str(s.status_code)] += 1
                    continue
                status = s.json().get("status")
                if status in TERMINAL:
                    tally.finished[rid] = (status, time.time())
                    break


async def ws_client(
    n: int, url: str, key: str, options: dict[str, Any], stop: float, drain_until: float, tally: Tally
) -> None:
    ws_url = url.replace("http://", "ws://") + f"/ws?api_key={key}"
    i = 0
    while time.time() < stop:
        try:
            async with websockets.connect(ws_url, max_size=None, open_timeout=60) as ws:
                while time.time() < stop:
                    crid = f"{n}.{i}"
                    t0 = time.time()
                    await ws.send(json.dumps({"type": "analyze", "client_request_id": crid, "options": options,
                                              "text": f"{TEXTS[(n + i) % len(TEXTS)]} ({crid})"}))  # fmt: skip
                    rid = await _ws_job(ws, key, crid, t0, stop, drain_until, tally)
                    if rid is not None:
                        i += 1
        except (OSError, websockets.WebSocketException) as exc:
            tally.transport_errors[type(exc).__name__] += 1
            await asyncio.sleep(1)


async def _ws_job(
    ws: Any, key: str, crid: str, t0: float, stop: float, drain_until: float, tally: Tally
) -> str | None:
    """Follow one submission to its end; None when it was refused (after waiting as told)."""
    rid: str | None = None
    while True:
        try:
            msg = json.loads(await asyncio.wait_for(ws.recv(), max(1.0, drain_until - time.time())))
        except TimeoutError:
            return rid  # past the drain deadline: the read-back says what became of it
        if msg.get("client_request_id") != crid:
            continue
        kind = msg.get("type")
        if kind == "queued":
            rid = msg["request_id"]
            tally.submit_seconds.append(time.time() - t0)
            tally.accepted[rid] = t0
            tally.owner[rid] = key
        elif kind == "error" and rid is None:
            tally.submit_seconds.append(time.time() - t0)
            tally.refusal(int(msg.get("code", 400)), msg.get("kind"))
            wait = float(msg.get("retry_after") or 1.0)
            await asyncio.sleep(min(wait, max(0.0, stop - time.time())))
            return None
        elif kind in ("result", "error", "request_cancelled") and rid is not None:
            status = {"result": "completed", "error": "failed", "request_cancelled": "cancelled"}[kind]
            tally.finished[rid] = (status, time.time())
            if kind == "error" and int(msg.get("code") or 0) >= 500:
                tally.server_errors["ws " + str(msg.get("code"))] += 1
            return rid


def _kind(r: httpx.Response) -> str | None:
    try:
        kind = r.json().get("kind")
    except ValueError:
        return None
    return str(kind) if kind else None


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": round(ordered[-1], 3),
            "mean": round(statistics.fmean(ordered), 3)}  # fmt: skip


async def run(args: argparse.Namespace, url: str, keys: list[str]) -> dict[str, Any]:
    options = json.loads(args.options) if args.options else DEFAULT_OPTIONS
    tally = Tally()
    start = time.time()
    stop = start + args.duration
    drain_until = stop + args.drain_timeout
    clients = []
    for n in range(args.clients):
        fn = ws_client if n % 2 else rest_client
        clients.append(fn(n, url, keys[n % len(keys)], options, stop, drain_until, tally))
    await asyncio.gather(*clients)
    ended = time.time()
    # the truth is the server's: read every accepted job back
    final: collections.Counter[str] = collections.Counter()
    lost: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for rid in tally.accepted:
            key = tally.owner[rid]
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = await http.get(f"/status/{rid}", headers=headers)
            while r.status_code == 429:  # the owner's rate limit: wait, the answer matters
                await asyncio.sleep(retry_after(r.headers))
                r = await http.get(f"/status/{rid}", headers=headers)
            status = r.json().get("status") if r.status_code == 200 else f"http {r.status_code}"
            final[status] += 1
            if status not in TERMINAL:
                lost.append(rid)
    latencies = [tally.finished[rid][1] - t0 for rid, t0 in tally.accepted.items()
                 if tally.finished.get(rid, ("",))[0] == "completed"]  # fmt: skip
    return {
        "clients": args.clients,
        "duration_s": args.duration,
        "wall_s": round(ended - start, 1),
        "options": options,
        "accepted": len(tally.accepted),
        "rejected": dict(sorted(tally.rejected.items())),
        "status_polls_refused": dict(sorted(tally.polls_refused.items())),
        "final_status": dict(final),
        "completed": final.get("completed", 0),
        "failed": final.get("failed", 0),
        "cancelled": final.get("cancelled", 0),
        "lost": len(lost),
        "lost_ids": lost[:20],
        "server_errors_5xx": dict(tally.server_errors),
        "transport_errors": dict(tally.transport_errors),
        "latency_s": percentiles(latencies),
        "submit_answer_s": percentiles(tally.submit_seconds),
        "completed_per_minute": round(final.get("completed", 0) / max(ended - start, 1e-9) * 60, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--duration", type=float, default=60, help="seconds during which clients submit")
    p.add_argument("--drain-timeout", type=float, default=600, help="seconds to wait for accepted jobs after")
    p.add_argument("--url", help="an already running server (loopback only); default: start one")
    p.add_argument(
        "--keys", help="with --url: the server's API keys as name:key,... (one per client, reused)"
    )
    p.add_argument("--options", help="analysis options as JSON (default: best_of_k 2, no salience)")
    p.add_argument("--server-env", default="", help="extra server settings, NAME=VALUE,... (own server only)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.clients < 1 or args.clients > 1000 or args.duration <= 0 or args.duration > 3600:
        raise SystemExit("--clients must be 1..1000 and --duration 0..3600 s")
    server = None
    workdir = Path(tempfile.mkdtemp(prefix="talkative-load-"))
    if args.url:
        loopback_only(args.url)
        url = args.url.rstrip("/")
        keys = [pair.split(":", 1)[1] for pair in (args.keys or "").split(",") if ":" in pair] or [""]
    else:
        names = [f"client{n:03d}" for n in range(args.clients)]
        keys = [secrets.token_urlsafe(24) for _ in names]
        extra = dict(item.split("=", 1) for item in args.server_env.split(",") if "=" in item)
        print(f"starting a server on the bundled model ({args.clients} keys) ...", flush=True)
        server = start_server(",".join(f"{n}:{k}" for n, k in zip(names, keys, strict=True)), workdir, extra)
        url = server.url
    try:
        print(f"{args.clients} clients for {args.duration:g} s against {url} ...", flush=True)
        results = asyncio.run(run(args, url, keys))
    finally:
        if server is not None:
            server.stop(timeout=120)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    ok = results["lost"] == 0 and not results["server_errors_5xx"]
    print("PASS: nothing lost, no 5xx" if ok else "FAIL: jobs lost or 5xx answers", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
