"""`talkative.client` against real server processes (tiny models): Client and AsyncClient, analysis waited for and
streamed, generation streamed and cancelled, vectors, models and switching, the API key, retries on 429, and
`talkative analyze --server`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import pytest
from e2e_helpers import FAST, Server

from talkative.client import (
    Analysis,
    APIError,
    AsyncClient,
    Client,
    JobFailed,
    Progress,
    TokenEvent,
)

pytestmark = pytest.mark.e2e

TEXT = "The capital of France is Paris."
LONG = {"max_new_tokens": 4096, "stop_at_end_of_turn": False}
LONG_TEXT = " ".join(f"w{i}" for i in range(100))


def test_analyze_waits_or_streams_progress(tiny_server: Server) -> None:
    with Client(tiny_server.url) as client:
        waited = client.analyze(TEXT, options=FAST)
        assert isinstance(waited, Analysis) and len(waited.tokens) >= 7
        assert waited.metadata["model_id"] == "tiny-a-l1" and len(waited.explanations) == len(waited.tokens)
        seen: list[Progress] = []
        # another seed: a request the result cache cannot answer, so the work (and its progress) really happens
        streamed = client.analyze(TEXT, options={**FAST, "batch_size": 2, "seed": 7}, on_progress=seen.append)
        assert [row["token"] for row in streamed.tokens] == [row["token"] for row in waited.tokens]
        stages = [p.stage for p in seen]
        assert stages[0] == "queued" and "preparing" in stages and stages.count("explanation_generation") >= 4
        assert all(p.request_id == streamed.request_id for p in seen)
        events = list(client.iter_analyze(messages=[{"role": "user", "content": "Hi"}], options=FAST))
        assert isinstance(events[-1], Analysis) and all(isinstance(e, Progress) for e in events[:-1])
        assert client.status(streamed.request_id).status == "completed"


def test_generate_streams_tokens_and_cancels(tiny_server: Server) -> None:
    with Client(tiny_server.url) as client:
        stream = client.generate("Once upon a time", max_new_tokens=8, num_completions=2, seed=1)
        tokens = list(stream)
        assert tokens and all(isinstance(t, TokenEvent) for t in tokens)
        result = stream.result
        assert len(result.completions) == 2 and result.request_id == stream.request_id
        first = "".join(t.token for t in tokens if t.completion == 0)
        assert result.completions[0].startswith(first) and result.metadata["seed"] == 1

        long = client.generate("A long story", **LONG)
        got = []
        with pytest.raises(JobFailed) as ended:
            for token in long:
                got.append(token)
                if len(got) == 5:
                    long.cancel()
        assert ended.value.status == "cancelled" and 5 <= len(got) < 4096
        assert client.status(long.request_id or "").status == "cancelled"


def test_vectors_models_switch_and_cancel(tiny_server: Server) -> None:
    with Client(tiny_server.url) as client:
        tokens = client.tokenize(TEXT)["tokens"]
        ext = client.extract(TEXT, positions=[0, -1])
        assert [t["position"] for t in ext.tokens] == [0, len(tokens) - 1] and len(ext.activations[0]) == 64
        described = client.describe(ext.activations, [t["token_id"] for t in ext.tokens], options=FAST)
        assert len(described.results) == 2 and described.reconstructions is None
        with_vectors = client.describe(ext.activations[1], options={**FAST, "return_vectors": True})
        assert (
            with_vectors.results[0]["token_assumed"] is True and len(with_vectors.reconstructions or []) == 1
        )
        scored = client.score(
            described.results[0]["explanation"], ext.activations[0], token=ext.tokens[0]["token_id"]
        )
        assert scored.results[0]["mse"] == pytest.approx(described.results[0]["mse"], rel=0.05)
        several = client.score(["a", "b"], ext.activations[0], salience=True)
        assert [r["explanation"] for r in several.results] == ["a", "b"]

        listing = client.models()
        assert listing.ids == ["tiny-a-l1", "tiny-a-l2", "tiny-b-l1"] and listing.current_model == "tiny-a-l1"
        switched = client.switch("tiny-a-l2")
        assert switched.status == "success" and switched.group_switched is False
        assert client.models().current_model == "tiny-a-l2"
        client.switch("tiny-a-l1")

        accepted = client.submit_analysis(LONG_TEXT, options=FAST)
        assert client.cancel(accepted.request_id)["status"] == "cancelled"
        with pytest.raises(TimeoutError, match="is still"):
            client.analyze(LONG_TEXT, options=FAST, timeout=0.01)
        with pytest.raises(APIError) as bad:
            client.analyze(TEXT, model_id="nope")
        assert bad.value.status == 404 and "nope" in bad.value.detail
        with pytest.raises(APIError) as dim:
            client.describe([[0.0] * 5])
        assert dim.value.status == 400 and "64" in dim.value.detail


def test_async_client(tiny_server: Server) -> None:
    async def main() -> None:
        async with AsyncClient(tiny_server.url) as client:
            seen: list[str] = []

            async def progress(p: Progress) -> None:
                seen.append(p.stage)

            fresh = "The capital of Italy is Rome."  # not analysed before on this server: no cached answer
            analysis = await client.analyze(fresh, options=FAST, on_progress=progress)
            assert analysis.tokens and seen[0] == "queued"
            polled = await client.analyze(fresh, options=FAST)
            assert [r["explanation"] for r in polled.tokens] == [r["explanation"] for r in analysis.tokens]
            stream = await client.generate("Hello", max_new_tokens=4)
            tokens = [t async for t in stream]
            result = await stream.result()
            assert tokens and result.completions and result.request_id == stream.request_id
            ext = await client.extract(TEXT, positions=[-1])
            scored = await client.score("a city", ext.activations[0])
            assert scored.results[0]["mse"] > 0
            described = await client.describe(ext.activations, options=FAST)
            assert described.results[0]["explanation"] is not None
            assert "tiny-b-l1" in (await client.models()).ids
            assert (await client.tokenize("hi"))["n_tokens"] >= 1
            long = await client.generate("Long", **LONG)
            with pytest.raises(JobFailed):
                async for token in long:
                    if token.position >= 0:
                        await long.cancel()
            assert (await client.status(long.request_id or "")).status == "cancelled"

    asyncio.run(main())


def test_api_key_from_the_environment(make_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server = make_server(API_KEY="client-test-key-0123456789", RATE_LIMIT_PER_MINUTE="0")
    monkeypatch.setenv("TALKATIVE_API_KEY", "client-test-key-0123456789")
    with Client(server.url) as client:
        assert client.analyze("hi there", options=FAST).tokens
        assert client.analyze("hi there", options=FAST, on_progress=lambda p: None).tokens
    monkeypatch.delenv("TALKATIVE_API_KEY")
    with Client(server.url, api_key="wrong-key-0123456789") as client, pytest.raises(APIError) as err:
        client.models()
    assert err.value.status == 401


def test_retries_on_429_honour_retry_after(make_server: Any) -> None:
    server = make_server(MAX_QUEUE_SIZE="1")
    with Client(server.url) as client:
        client.analyze("warm up", options=FAST)  # one finished job: Retry-After becomes about a job's time
    blocker = server.post("/generate", {"text": "Block", "options": LONG}).json()["request_id"]
    refused = httpx.post(f"{server.url}/analyze", json={"text": "x", "options": FAST}, timeout=30)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    with Client(server.url, max_retries=0) as impatient, pytest.raises(APIError) as err:
        impatient.analyze("x", options=FAST)
    assert err.value.status == 429 and err.value.retry_after is not None

    with Client(server.url, max_retries=10) as client:
        threading.Timer(1.5, lambda: server.post(f"/cancel/{blocker}")).start()
        t0 = time.monotonic()
        assert client.analyze("queued after a refusal", options=FAST).tokens
        assert time.monotonic() - t0 >= 1.0  # it waited for the blocker instead of failing
        again = server.post("/generate", {"text": "Block", "options": LONG}).json()["request_id"]
        threading.Timer(1.5, lambda: server.post(f"/cancel/{again}")).start()
        t0 = time.monotonic()
        seen: list[Progress] = []
        assert client.analyze("over the WebSocket", options=FAST, on_progress=seen.append).tokens
        assert time.monotonic() - t0 >= 1.0 and seen[0].stage == "queued"


def test_cli_analyze_with_server(tiny_server: Server) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "talkative.cli",
            "analyze",
            TEXT,
            "--server",
            tiny_server.url,
            "--json",
            "-k",
            "1",
            "--no-kl",
            "--no-salience",
            "--model-id",
            "tiny-a-l2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["metadata"]["model_id"] == "tiny-a-l2" and len(body["tokens"]) >= 7
