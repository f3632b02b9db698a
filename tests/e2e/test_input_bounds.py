"""Every request field is bounded before anything tokenizes it, and nothing tokenizes on the event loop: a long
prompt piece is a fast 400 and `/health` stays fast while such requests arrive."""

from __future__ import annotations

import json
import statistics
import threading
import time

import httpx
import pytest
from e2e_helpers import Server

pytestmark = pytest.mark.e2e

MEGABYTE_PIECE = "word " * 200_000  # 1,000,000 characters, ~200,000 tokens, under the 1 MiB body limit


def _post(server: Server, path: str, body: dict) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    r = httpx.post(server.url + path, json=body, timeout=60)
    return r.status_code, r.text, time.perf_counter() - t0


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        ("/analyze", {"text": "Hello.", "options": {"add_tokens": [MEGABYTE_PIECE]}}, "add_tokens"),
        ("/analyze", {"text": "Hello.", "options": {"replace_left": MEGABYTE_PIECE}}, "replace_left"),
        ("/analyze", {"text": "Hello.", "model_id": "m" * 100_000}, "model_id"),
        ("/api/v1/describe", {"vectors": [[0.0] * 64], "tokens": [MEGABYTE_PIECE]}, "tokens"),
        ("/api/v1/score", {"explanations": [MEGABYTE_PIECE], "vector": [0.0] * 64}, "explanations"),
        ("/api/v1/score", {"explanation": "x", "token": MEGABYTE_PIECE, "vector": [0.0] * 64}, "token"),
    ],
)
def test_a_megabyte_field_is_a_fast_400_naming_it(
    tiny_server: Server, path: str, body: dict, fragment: str
) -> None:
    status, text, seconds = _post(tiny_server, path, body)
    assert status == 400, text
    assert fragment in text and "at most" in text, text
    assert seconds < 5, seconds


def test_health_stays_fast_while_megabyte_pieces_arrive(tiny_server: Server) -> None:
    """Twelve 1 MB add_tokens items from four clients at once (tokenizing each took over a second on the event
    loop before the bound): every one refused with 400, and /health answers about as fast as without them (the
    allowance covers a loaded test machine; a blocked event loop costs seconds)."""
    payload = json.dumps({"text": "Hello.", "options": {"add_tokens": [MEGABYTE_PIECE]}}).encode()
    headers = {"Content-Type": "application/json"}

    def health() -> float:
        t0 = time.perf_counter()
        assert tiny_server.get("/health").status_code == 200
        return time.perf_counter() - t0

    baseline = statistics.median(health() for _ in range(5))
    statuses: list[int] = []

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            for _ in range(3):
                statuses.append(
                    c.post(tiny_server.url + "/analyze", content=payload, headers=headers).status_code
                )

    workers = [threading.Thread(target=client) for _ in range(4)]
    for w in workers:
        w.start()
    latencies = [health()]
    deadline = time.monotonic() + 60
    while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
        latencies.append(health())
        time.sleep(0.02)
    for w in workers:
        w.join(timeout=60)
    assert statuses == [400] * 12, statuses
    assert statistics.median(latencies) < 0.5 + 2 * baseline, (baseline, latencies)
