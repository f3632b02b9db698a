"""The server on the repository's own model_groups.json (the bundled SmolLM2), as `make run` serves it."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from e2e_helpers import Server

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


async def seed_client(uri: str) -> list[str]:
    """The client of the seed's API documentation, unchanged apart from collecting what it prints."""
    printed = []
    async with websockets.connect(uri) as websocket:
        await websocket.send(
            json.dumps(
                {
                    "type": "analyze",
                    "text": "The capital of France is Paris.",
                    "options": {"temperature": 1.0, "optimize_explanations_config": {"best_of_k": 8}},
                }
            )
        )
        while True:
            data = json.loads(await websocket.recv())
            if data["type"] == "result":
                for row in data["tokens"]:
                    printed.append(f"{row['token']}: {row['explanation']}")
                break
            elif data["type"] == "error":
                printed.append(f"Error: {data['error']}")
                break
    return printed


def test_seed_documentation_client(bundled_server: Server) -> None:
    printed = asyncio.run(asyncio.wait_for(seed_client(bundled_server.ws_url), 600))
    assert not printed[0].startswith("Error"), printed
    assert len(printed) == 7 and printed[0].startswith("The:") and printed[-2].startswith(" Paris:")
    print("\n".join(printed))


def test_rest_analysis_on_the_bundled_model(bundled_server: Server) -> None:
    assert bundled_server.get("/").json()["name"] == "Consistency Lens API"
    models = bundled_server.get("/api/v2/models").json()
    assert models["current_model"] == "smollm2-135m-l12" and models["groups"][0]["is_loaded"]
    rid = bundled_server.analyze(
        "Paris is in France.",
        {"optimize_explanations_config": {"best_of_k": 2}, "no_kl": False},
        model_id="smollm2-135m-l10-untrained",
    )
    body = bundled_server.wait(rid, timeout=600)
    assert body["status"] == "completed", body
    rows, meta = body["result"]["tokens"], body["result"]["metadata"]
    assert meta["model_id"] == "smollm2-135m-l10-untrained" and meta["layer"] == 10 and meta["best_of_k"] == 2
    assert all(r["kl_divergence"] is not None and r["mse"] is not None and r["explanation"] for r in rows)
