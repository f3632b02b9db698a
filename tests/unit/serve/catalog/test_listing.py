"""The catalogue's views, built in one place: every view shows a client the same groups and models, hidden and
backend_only entries never leak, and the client's own choice of model is shown even when it is hidden."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from talkative.serve.catalog import listing
from talkative.serve.catalog.listing import CatalogState
from talkative.serve.catalog.registry import Registry, parse_registry
from talkative.serve.settings import Settings


@dataclass(frozen=True)
class Who:
    is_admin: bool = False
    key: str | None = "ip:192.0.2.1"


USER, ADMIN = Who(), Who(is_admin=True, key="key:admin")


def model(mid: str, **kw: Any) -> dict[str, Any]:
    return {"id": mid, "name": mid.upper(), "checkpoint": f"init:bundled:x@{len(mid)}", "layer": 3, **kw}


def registry() -> Registry:
    return parse_registry(
        {
            "model_groups": [
                {
                    "group_id": "open",
                    "group_name": "Open",
                    "base_model_path": "bundled:x",
                    "description": "",
                    "models": [model("a"), model("hidden", visible=False), model("mine", backend_only=True)],
                },
                {
                    "group_id": "staff",
                    "group_name": "Staff",
                    "base_model_path": "bundled:x",
                    "description": "",
                    "backend_only": True,
                    "models": [model("s")],
                },
                {
                    "group_id": "secret",
                    "group_name": "Secret",
                    "base_model_path": "bundled:x",
                    "description": "",
                    "visible": False,
                    "models": [model("z")],
                },
            ]
        }
    )


def settings(tmp_path: Path) -> Settings:
    return Settings(model_groups_file=tmp_path / "none.json", data_dir=tmp_path / "data")


STATE = CatalogState(
    on_device={"open": "cpu", "secret": "cuda:0"},
    cached_groups=["staff"],
    cached_models=["s"],
    loaded_models=frozenset({"a", "hidden", "mine", "z"}),
    current="a",
    own=None,
    switching=False,
)


def listed(view: dict[str, Any]) -> set[str]:
    return {m["id"] for g in view["groups"] for m in g["models"]}


def test_a_client_sees_only_what_it_may_use_in_every_view(tmp_path: Path) -> None:
    reg = registry()
    user = listing.client_listing(reg, settings(tmp_path), STATE, USER)
    assert listed(user) == {"a"} and [g["group_id"] for g in user["groups"]] == ["open"]
    cache = user["model_status"]["cache_info"]
    assert cache == {"groups_loaded": ["open"], "models_cached": [], "base_locations": {"open": "cpu"}}
    slim = listing.slim_groups(reg, STATE, USER)
    assert [g["id"] for g in slim["model_groups"]] == ["open"] and slim["model_groups"][0][
        "default_layer"
    ] == "a"
    memory = listing.memory_view(reg, STATE, USER)
    assert memory["cache_info"]["base_model_cache"] == {"open": "cpu"} and memory["current_model"] == "a"

    admin = listing.client_listing(reg, settings(tmp_path), STATE, ADMIN)
    assert listed(admin) == {"a", "mine", "s"}
    staff = next(g for g in admin["groups"] if g["group_id"] == "staff")
    assert staff["backend_only"] and staff["location"] == "cpu_cache" and staff["models"][0]["backend_only"]


def test_the_current_model_is_shown_when_the_client_chose_it(tmp_path: Path) -> None:
    reg = registry()
    hidden_default = replace(STATE, current="hidden")
    view = listing.client_listing(reg, settings(tmp_path), hidden_default, USER)
    assert (
        view["current_model"] is None and view["current_group"] == "open"
    )  # the group is shown, not the model
    assert listing.slim_groups(reg, hidden_default, USER)["current_model_id"] is None
    chosen = replace(STATE, current="hidden", own="hidden")
    view = listing.client_listing(reg, settings(tmp_path), chosen, USER)
    assert view["current_model"] == "hidden" and view["current_group"] == "open"
    assert listing.memory_view(reg, chosen, USER)["current_model"] == "hidden"


def test_a_slim_group_runs_its_first_listed_model_else_the_first_usable(tmp_path: Path) -> None:
    reg = registry()
    assert listing.default_model(reg, reg.group("open"), USER) == "a"
    assert listing.default_model(reg, reg.group("secret"), USER) == "z"  # hidden, but runs when named
    assert listing.default_model(reg, reg.group("staff"), USER) is None
    layers = listing.slim_layers(reg, STATE, reg.group("open"), "a", USER)
    assert [m["id"] for m in layers["layers"]] == ["a"] and layers["layers"][0]["is_current"]
