"""model_groups.json parsing (the seed's schema) and the per-model settings chain."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from talkative.defaults import default_checkpoint_spec
from talkative.serve.catalog.registry import (
    RegistryError,
    UnknownModel,
    env_name,
    load_registry,
    parse_registry,
)
from talkative.serve.settings import Settings


def seed_file(**settings: Any) -> dict[str, Any]:
    return {
        "model_groups": [
            {
                "group_id": "gemma3-27b-it",
                "group_name": "Gemma 3 27B IT",
                "base_model_path": "google/gemma-3-27b-it",
                "description": "…",
                "visible": True,
                "models": [
                    {
                        "id": "gemma3-27b-chat",
                        "name": "Chat L45",
                        "lens_checkpoint_path": "/ckpt/a",
                        "OLDlens_checkpoint_path": "/old",
                        "IGNOREdifferent_activations_orig_path": "x",
                        "different_activations_orig_path": None,
                        "layer": 45,
                        "description": "…",
                        "batch_size": 16,
                        "auto_batch_size_max": 512,
                        "visible": True,
                        "backend_only": False,
                    },
                    {
                        "id": "gemma3-27b-l30",
                        "name": "L30",
                        "checkpoint": "init:bundled:x@30",
                        "visible": False,
                    },
                ],
            },
            {
                "group_id": "qwen2.5-14b",
                "group_name": "Qwen",
                "base_model_path": "Qwen/Qwen2.5-14B-Instruct",
                "use_bf16": True,
                "models": [
                    {"id": "qwen2.5-14b-wildchat", "name": "Q", "checkpoint": "rel/ckpt", "layer": 36}
                ],
            },
        ],
        "settings": {
            "default_group": "gemma3-27b-it",
            "max_cpu_models": 5,
            "no_kl": True,
            "batch_size": 8,
            "comparison_tl_checkpoint": False,
            "estimated_gpu_memory": {"gemma3-27b-it": "50GB"},
            **settings,
        },
    }


def make(tmp_path: Path, **settings: Any):  # type: ignore[no-untyped-def]
    path = tmp_path / "model_groups.json"
    path.write_text(json.dumps(seed_file(**settings)))
    return load_registry(path)


def test_seed_schema_is_read(tmp_path: Path) -> None:
    reg = make(tmp_path)
    assert list(reg.groups) == ["gemma3-27b-it", "qwen2.5-14b"]
    chat = reg.model("gemma3-27b-chat")
    assert chat.checkpoint == "/ckpt/a" and chat.layer == 45 and chat.batch_size == 16
    assert reg.model("gemma3-27b-l30").layer == 30 and reg.model("gemma3-27b-l30").visible is False
    assert reg.model("qwen2.5-14b-wildchat").checkpoint == str((tmp_path / "rel/ckpt").resolve())
    assert reg.groups["gemma3-27b-it"].estimated_memory == "50GB"
    assert chat.group_id == "gemma3-27b-it"
    with pytest.raises(UnknownModel):
        reg.model("nope")
    assert "gemma3-27b-chat" in json.dumps(reg.describe())


def test_default_checkpoint_and_errors(tmp_path: Path) -> None:
    data = {"model_groups": [{"group_id": "g", "models": [{"id": "m", "checkpoint": "default"}]}]}
    assert parse_registry(data).model("m").checkpoint == default_checkpoint_spec()
    bad = [
        {"model_groups": [{"group_id": "g", "models": [{"id": "m"}]}]},
        {"model_groups": [{"group_id": "g", "models": []}]},
        {
            "model_groups": [
                {"group_id": "g", "models": [{"id": "m", "checkpoint": "a"}]},
                {"group_id": "h", "models": [{"id": "m", "checkpoint": "b"}]},
            ]
        },
        {
            "model_groups": [
                {"group_id": "g", "models": [{"id": "m", "checkpoint": "a", "batch_size": "lots"}]}
            ]
        },
        {"groups": []},
    ]
    for data in bad:
        with pytest.raises(RegistryError):
            parse_registry(data)
    with pytest.raises(RegistryError, match="cannot read"):
        load_registry(tmp_path / "missing.json")
    reg = parse_registry({"model_groups": [{"group_id": "g", "models": [{"id": "m", "checkpoint": "a"}]}]})
    with pytest.raises(RegistryError, match="default group"):
        reg.default_group(Settings(default_group="nope", model_groups_file=tmp_path / "missing.json"))


def test_env_names() -> None:
    assert env_name("gemma3-27b-chat") == "GEMMA3_27B_CHAT"
    assert env_name("qwen2.5-14b") == "QWEN2_5_14B"


def test_override_chain(tmp_path: Path) -> None:
    reg = make(tmp_path)
    s = Settings(model_groups_file=tmp_path / "model_groups.json")
    chat, l30 = "gemma3-27b-chat", "gemma3-27b-l30"
    # no environment: the model's own JSON value, else JSON settings, else the default
    reg.bind_environment({})
    assert reg.model_setting(s, "batch_size", model_id=chat) == 16
    assert reg.model_setting(s, "batch_size", model_id=l30) == 8
    assert reg.model_setting(s, "auto_batch_size_max", model_id=l30) == 256
    assert reg.model_setting(s, "no_kl", model_id=chat) is True
    assert reg.model_setting(s, "use_bf16", group_id="qwen2.5-14b") is True  # the group's own JSON key
    assert reg.model_setting(s, "comparison_tl_checkpoint", model_id=chat) is False
    # GLOBAL_ beats every JSON value (else an environment override of a JSON-configured model would do nothing)
    s = Settings(model_groups_file=tmp_path / "model_groups.json", global_batch_size=48)
    assert reg.model_setting(s, "batch_size", model_id=chat) == 48
    # MODEL_GROUP_ beats GLOBAL_, MODEL_ beats MODEL_GROUP_; '-' and '.' become '_', case does not matter
    reg.bind_environment(
        {
            "MODEL_GROUP_gemma3_27b_it_BATCH_SIZE": "32",
            "MODEL_gemma3_27b_chat_BATCH_SIZE": "16",
            "model_qwen2_5_14b_wildchat_auto_batch_size_max": "768",
            "MODEL_GROUP_qwen2_5_14b_COMPARISON_TL_CHECKPOINT": "false",
            "MODEL_typo_BATCH_SIZE": "1",
            "MODEL_GROUPS_FILE_IS_NOT_A_SETTING": "x",
        }
    )
    assert reg.model_setting(s, "batch_size", model_id=chat) == 16
    assert reg.model_setting(s, "batch_size", model_id=l30) == 32
    assert reg.model_setting(s, "auto_batch_size_max", model_id="qwen2.5-14b-wildchat") == 768
    assert reg.model_setting(s, "comparison_tl_checkpoint", model_id="qwen2.5-14b-wildchat") is False
    assert "MODEL_TYPO_BATCH_SIZE" in reg.unmatched_overrides
    with pytest.raises(RegistryError, match="MODEL_GEMMA3_27B_CHAT_BATCH_SIZE"):
        reg.bind_environment({"MODEL_gemma3_27b_chat_BATCH_SIZE": "many"})


def test_cpu_cache_capacity_chain(tmp_path: Path) -> None:
    reg = make(tmp_path)
    assert reg.max_cpu_groups(Settings(max_cpu_cached_models=3)) == 3
    assert reg.max_cpu_groups(Settings(max_cpu_cached_models=3, global_max_cpu_models=1)) == 1
    # JSON settings.max_cpu_models feeds MAX_CPU_CACHED_MODELS when the environment does not set it
    assert Settings(model_groups_file=tmp_path / "model_groups.json").max_cpu_cached_models == 5


def test_use_bf16_auto_picks_bfloat16_where_the_device_computes_it_natively(tmp_path: Path) -> None:
    from talkative.nla.precision import bf16_is_fast
    from talkative.serve.catalog.residency import Residency

    reg = make(tmp_path)
    s = Settings(model_groups_file=tmp_path / "model_groups.json")
    reg.bind_environment({"MODEL_GROUP_qwen2_5_14b_USE_BF16": "AUTO"})
    assert reg.model_setting(s, "use_bf16", group_id="qwen2.5-14b") == "auto"
    native = "bfloat16" if bf16_is_fast("cpu") else "float32"
    assert Residency(reg, s)._dtype("qwen2.5-14b", "cpu") == native
    assert Residency(reg, s)._dtype("qwen2.5-14b", "meta") == "float32"  # no native bf16 known there
    # a model that nothing sets: auto is the default
    assert reg.model_setting(s, "use_bf16", group_id="gemma3-27b-it") == "auto"
    assert Residency(reg, s)._dtype("gemma3-27b-it", "cpu") == native
    auto = Settings(model_groups_file=tmp_path / "model_groups.json", global_use_bf16="auto")
    reg.bind_environment({})
    assert reg.model_setting(auto, "use_bf16", group_id="gemma3-27b-it") == "auto"
    # true and false still force one dtype; anything else names the variable
    forced = Settings(model_groups_file=tmp_path / "model_groups.json", global_use_bf16=True)
    assert Residency(reg, forced)._dtype("gemma3-27b-it", "meta") == "bfloat16"
    with pytest.raises(RegistryError, match="MODEL_GROUP_QWEN2_5_14B_USE_BF16"):
        reg.bind_environment({"MODEL_GROUP_qwen2_5_14b_USE_BF16": "sometimes"})
