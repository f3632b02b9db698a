"""Settings precedence: environment > .env in the working directory > .env at the repo root > JSON > defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from talkative.defaults import repo_root
from talkative.serve import settings as settings_mod
from talkative.serve.settings import Settings


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    root, cwd = tmp_path / "repo", tmp_path / "work"
    root.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(settings_mod, "repo_root", lambda: root)
    monkeypatch.chdir(cwd)
    for var in (
        "MAX_QUEUE_SIZE",
        "DEFAULT_GROUP",
        "MAX_CPU_CACHED_MODELS",
        "MODEL_GROUPS_FILE",
        "DEVICES",
        "DEVICE",
        "API_KEY",
        "ALLOWED_ORIGINS",
        "LAZY_LOAD_MODEL",
        "PORT",
    ):
        monkeypatch.delenv(var, raising=False)
    (root / "model_groups.json").write_text(
        json.dumps(
            {
                "model_groups": [],
                "settings": {
                    "default_group": "json-group",
                    "max_cpu_models": 7,
                    "max_queue_size": 11,
                    "batch_size": 3,
                },
            }
        )
    )
    return {"root": root, "cwd": cwd}


def test_each_layer_beats_the_ones_below(layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings.load()
    assert (s.max_queue_size, s.default_group, s.max_cpu_cached_models) == (11, "json-group", 7)

    (layout["root"] / ".env").write_text("MAX_QUEUE_SIZE=22\nDEFAULT_GROUP=root-env\nPORT=9001\n")
    s = Settings.load()
    assert (s.max_queue_size, s.default_group, s.port) == (22, "root-env", 9001)

    (layout["cwd"] / ".env").write_text("MAX_QUEUE_SIZE=33\nDEFAULT_GROUP=cwd-env\n")
    s = Settings.load()
    assert (s.max_queue_size, s.default_group, s.port) == (33, "cwd-env", 9001)

    monkeypatch.setenv("MAX_QUEUE_SIZE", "44")
    monkeypatch.setenv("MAX_CPU_CACHED_MODELS", "1")
    s = Settings.load()
    assert (s.max_queue_size, s.default_group, s.max_cpu_cached_models) == (44, "cwd-env", 1)
    assert Settings.load(max_queue_size=55).max_queue_size == 55  # explicit arguments (the CLI) beat all


def test_per_model_keys_of_the_json_are_not_global_fields(layout: dict[str, Path]) -> None:
    s = Settings.load()
    assert s.global_batch_size is None  # JSON settings.batch_size is resolved per model by the registry


def test_dotenv_model_overrides_follow_the_same_layers(
    layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    (layout["root"] / ".env").write_text("MODEL_m1_BATCH_SIZE=4\nMODEL_GROUP_g_BATCH_SIZE=5\n")
    (layout["cwd"] / ".env").write_text("MODEL_m1_BATCH_SIZE=6\n")
    monkeypatch.setenv("MODEL_GROUP_g_BATCH_SIZE", "7")
    overrides = Settings.load().environment_overrides
    assert overrides["MODEL_M1_BATCH_SIZE"] == "6" and overrides["MODEL_GROUP_G_BATCH_SIZE"] == "7"


def test_lists_devices_and_empty_values(layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVICES", "cuda:0, cuda:1,cuda:0")
    monkeypatch.setenv("ALLOWED_ORIGINS", "*")
    monkeypatch.setenv("API_KEY", "")
    monkeypatch.setenv("LAZY_LOAD_MODEL", "true")
    s = Settings.load()
    assert s.resolved_devices() == ["cuda:0", "cuda:1"]
    assert s.cors_origins() == ["*"] and s.api_key is None and s.lazy_load_model is True
    monkeypatch.delenv("DEVICES")
    monkeypatch.setenv("DEVICE", "cuda")
    assert Settings.load().resolved_devices() == ["cuda:0"]
    monkeypatch.setenv("ALLOWED_ORIGINS", "https://example.org")
    assert "https://example.org" in Settings.load().cors_origins()
    assert "http://localhost:3000" in Settings.load().cors_origins()


def test_defaults(layout: dict[str, Path]) -> None:
    s = Settings.load()
    assert (s.bind_host(), s.port, s.enable_docs, s.num_workers_per_gpu, s.result_retention_days) == (
        "127.0.0.1",
        8000,
        True,
        1,
        7,
    )
    with pytest.raises(ValueError):
        Settings.load(log_level="loud")


def test_empty_values_leave_the_lower_layers_in_charge(layout: dict[str, Path]) -> None:
    # a copied .env.example sets DEFAULT_GROUP= and DEVICES=: they must not hide the JSON's default group
    (layout["cwd"] / ".env").write_text("DEFAULT_GROUP=\nDEVICES=\nAPI_KEY=\nTUNED_LENS_DIR=\n")
    s = Settings.load()
    assert (
        s.default_group == "json-group" and s.devices == [] and s.api_key is None and s.tuned_lens_dir is None
    )


def test_env_example_parses(layout: dict[str, Path]) -> None:
    example = repo_root() / ".env.example"
    (layout["cwd"] / ".env").write_text(example.read_text())
    s = Settings.load()
    assert s.default_group == "json-group" and s.port == 8000 and s.max_text_length == 20000


def test_no_orig_is_accepted_read_by_nothing_and_documented_as_inert(layout: dict[str, Path]) -> None:
    """The seed's files and environments set `no_orig`; it is accepted (refusing it would refuse them), it
    resolves like any per-model setting, no serving code reads it, and the server docs say it has no effect."""
    from talkative.serve.catalog.registry import parse_registry

    registry = parse_registry(
        {
            "model_groups": [
                {"group_id": "g", "models": [{"id": "m", "checkpoint": "init:x@1", "no_orig": False}]}
            ]
        }
    )
    assert registry.model_setting(Settings.load(), "no_orig", model_id="m") is False
    assert set(settings_mod.INERT_SETTINGS) <= set(settings_mod.MODEL_SETTINGS)
    serve = repo_root() / "talkative" / "serve"
    readers = {
        str(p.relative_to(serve)) for p in serve.rglob("*.py") if "no_orig" in p.read_text(encoding="utf-8")
    }
    assert readers == {"settings.py", "catalog/registry.py"}  # the setting tables, nothing that acts on it
    docs = (repo_root() / "docs" / "server.md").read_text(encoding="utf-8")
    assert "`no_orig` has no effect" in docs
