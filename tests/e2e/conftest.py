"""End-to-end fixtures: real server processes (uvicorn in a subprocess, free port, DATA_DIR in tmp).

Fast tests run on tiny random Llamas saved to disk with the SmolLM2 tokenizer, served through `init:<dir>@L`
specs from a generated model_groups.json: group `tiny-a` (layers 1 and 2 of one tiny model) and group `tiny-b`
(another tiny model). `bundled_server` serves the repository's own model_groups.json (the bundled SmolLM2).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_helpers import launch
from e2e_helpers import REPO, Server
from playwright.sync_api import BrowserContext, Page, Playwright, sync_playwright


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> dict[str, Path]:
    """Two tiny random Llamas (6 blocks, d=64) with the SmolLM2 tokenizer, saved as HF directories."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = tmp_path_factory.mktemp("tiny-models")
    dirs = {}
    for name, seed in (("a", 0), ("b", 1)):
        cfg = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
        path = root / f"tiny-{name}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[name] = path
    return dirs


@pytest.fixture(scope="session")
def tiny_groups(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model_groups.json in the seed's schema over the tiny models (seed key names on purpose)."""
    a, b = tiny_dirs["a"], tiny_dirs["b"]
    data = {
        "model_groups": [
            {
                "group_id": "tiny-a",
                "group_name": "Tiny A",
                "base_model_path": str(a),
                "description": "tiny random llama",
                "visible": True,
                "models": [
                    {
                        "id": "tiny-a-l1",
                        "name": "Tiny A L1",
                        "lens_checkpoint_path": f"init:{a}@1",
                        "layer": 1,
                        "OLDlens_checkpoint_path": "/nowhere",
                        "auto_batch_size_max": 32,
                    },
                    {
                        "id": "tiny-a-l2",
                        "name": "Tiny A L2",
                        "checkpoint": f"init:{a}@2",
                        "layer": 2,
                        "auto_batch_size_max": 32,
                    },
                ],
            },
            {
                "group_id": "tiny-b",
                "group_name": "Tiny B",
                "base_model_path": str(b),
                "models": [
                    {
                        "id": "tiny-b-l1",
                        "name": "Tiny B L1",
                        "checkpoint": f"init:{b}@1",
                        "layer": 1,
                        "auto_batch_size_max": 32,
                    }
                ],
            },
        ],
        "settings": {"default_group": "tiny-a", "max_cpu_models": 2, "use_bf16": False},
    }
    path = tmp_path_factory.mktemp("groups") / "model_groups.json"
    path.write_text(json.dumps(data, indent=2))
    return path


@pytest.fixture
def make_server(tmp_path: Path, tiny_groups: Path) -> Iterator[Callable[..., Server]]:
    """Start servers over the tiny groups; every one is stopped at the end of the test."""
    servers: list[Server] = []

    def make(start: bool = True, **env: str) -> Server:
        workdir = tmp_path / f"server{len(servers)}"
        workdir.mkdir()
        base = {
            "MODEL_GROUPS_FILE": str(tiny_groups),
            "DATA_DIR": str(workdir / "data"),
            "QUEUE_UPDATE_INTERVAL": "0.5",
            "LOG_LEVEL": "info",
            "HF_HUB_OFFLINE": "1",
        }
        server = Server(workdir, {**base, **env}, name=f"server{len(servers)}")
        servers.append(server)
        return server.start() if start else server

    yield make
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory, tiny_groups: Path) -> Iterator[Server]:
    """One server over the tiny groups shared by a module's tests (jobs are independent by id)."""
    workdir = tmp_path_factory.mktemp("tiny-server")
    server = Server(
        workdir,
        {
            "MODEL_GROUPS_FILE": str(tiny_groups),
            "DATA_DIR": str(workdir / "data"),
            "QUEUE_UPDATE_INTERVAL": "0.5",
            "MAX_ACTIVE_JOBS": "3",
            "HF_HUB_OFFLINE": "1",
        },
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bundled_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The repository's own model_groups.json: the bundled SmolLM2, exactly what `make run` serves."""
    workdir = tmp_path_factory.mktemp("bundled-server")
    server = Server(
        workdir, {"DATA_DIR": str(workdir / "data"), "MODEL_GROUPS_FILE": str(REPO / "model_groups.json")}
    )
    server.start(timeout=300)
    yield server
    server.stop()


# -- the browser tests' chromium: one Playwright per module, a fresh profile per test ----------------------------------
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture
def browser(playwright: Playwright, tmp_path: Path) -> Iterator[BrowserContext]:
    context = launch(playwright, tmp_path / "profile")
    yield context
    context.close()


@pytest.fixture
def page(browser: BrowserContext) -> Iterator[Page]:
    """A page whose uncaught JavaScript errors fail the test."""
    page = browser.pages[0] if browser.pages else browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    assert not errors, f"uncaught JavaScript errors: {errors}"
