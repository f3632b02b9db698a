"""Every view of the model catalogue a client gets, built in one place.

`GET /api/v2/models`, the WebSocket `model_groups_list`, the slim API's `/models` and `/models/{id}/layers`,
`GET /api/v2/models/memory` and `GET /api/v2/models/{id}/info` all show groups and models: which exist, which are
loaded, which is the client's current one. They are built here from one snapshot (`CatalogState`) and the
visibility rules (`visibility.py`), so a hidden or backend_only model cannot leak through one view while another
hides it, and a field means the same in each. The slim views are projections of the v2 listing's entries.

The snapshot is read from the scheduler and the residency by the caller (`api/deps.py`): the catalogue does not
import the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..settings import Settings
from . import visibility
from .registry import GroupEntry, ModelEntry, Registry
from .visibility import Identity


@dataclass(frozen=True)
class CatalogState:
    """What is loaded where, and which model is current, for one client at one moment."""

    #: group id -> the device holding it
    on_device: dict[str, str]
    #: groups in the CPU cache, and their models
    cached_groups: list[str]
    cached_models: list[str]
    #: models whose group is loaded on a device (they can run now)
    loaded_models: frozenset[str]
    #: the client's current model: its own choice, else the server's default
    current: str | None
    #: the client's own choice (None: it follows the server's default)
    own: str | None
    #: a group is being brought onto a device
    switching: bool

    def location(self, group_id: str) -> str | None:
        """The device holding a group, `cpu_cache`, or None."""
        return self.on_device.get(group_id) or ("cpu_cache" if group_id in self.cached_groups else None)


def _setting(registry: Registry, settings: Settings, name: str, model_id: str) -> Any:
    return registry.model_setting(settings, name, model_id=model_id)


def shown_current(registry: Registry, state: CatalogState, who: Identity) -> str | None:
    """The current model as this client may see it: its own choice always (it named it), the server's default
    only when the client may see that model."""
    if state.current is not None and state.current == state.own:
        return state.current
    return visibility.shown_model(registry, state.current, who)


def group_of(registry: Registry, model_id: str | None) -> str | None:
    return registry.model(model_id).group_id if model_id else None


# -- the v2 listing (REST and WebSocket) -----------------------------------------------------------------------------
def model_entry(
    registry: Registry, settings: Settings, state: CatalogState, model: ModelEntry
) -> dict[str, Any]:
    return {
        "id": model.id,
        "name": model.name,
        "layer": model.layer,
        "description": model.description,
        "batch_size": _setting(registry, settings, "batch_size", model.id),
        "auto_batch_size_max": _setting(registry, settings, "auto_batch_size_max", model.id),
        "backend_only": visibility.backend_only(registry, model.id),
        "is_loaded": model.id in state.loaded_models,
        "is_current": model.id == state.current,
    }


def group_entry(
    registry: Registry, settings: Settings, state: CatalogState, group: GroupEntry, who: Identity
) -> dict[str, Any]:
    """A group with the models this client sees in it."""
    return {
        "group_id": group.group_id,
        "group_name": group.group_name,
        "description": group.description,
        "base_model": group.base_model_path,
        "is_loaded": group.group_id in state.on_device,
        "location": state.location(group.group_id),
        "estimated_memory": group.estimated_memory,
        "models": [
            model_entry(registry, settings, state, m) for m in visibility.listed_models(registry, group, who)
        ],
        "backend_only": group.backend_only,
    }


def cache_info(registry: Registry, state: CatalogState, who: Identity) -> dict[str, Any]:
    """What is loaded and cached, without the groups and models this client never sees."""
    on_device = {g: d for g, d in state.on_device.items() if visibility.sees_group(registry, g, who)}
    cached = [g for g in state.cached_groups if visibility.sees_group(registry, g, who)]
    return {
        "groups_loaded": list(on_device),
        "models_cached": [m for m in state.cached_models if visibility.sees_model(registry, m, who)],
        "base_locations": {g: "cpu_cache" for g in cached} | on_device,
    }


def client_listing(
    registry: Registry, settings: Settings, state: CatalogState, who: Identity
) -> dict[str, Any]:
    """`GET /api/v2/models` and the WebSocket `model_groups_list`, as this client may see them; `is_current` and
    `current_model` are the client's."""
    current = shown_current(registry, state, who)
    # the client's own choice names its group; the server's default names its group when that group is shown,
    # even when the model itself is not
    own = current is not None and current == state.own
    group = (
        group_of(registry, current)
        if own
        else visibility.shown_group(registry, group_of(registry, state.current), who)
    )
    return {
        "groups": [
            group_entry(registry, settings, state, g, who) for g in visibility.listed_groups(registry, who)
        ],
        "current_model": current,
        "current_group": group,
        "is_switching": state.switching,
        "model_status": {
            "model_id": visibility.shown_model(registry, state.current, who),
            "group_id": visibility.shown_group(registry, group_of(registry, state.current), who),
            "is_loaded": state.current is not None and state.current in state.loaded_models,
            "cache_info": cache_info(registry, state, who),
        },
    }


# -- the slim API's views --------------------------------------------------------------------------------------------
def default_model(registry: Registry, group: GroupEntry, who: Identity) -> str | None:
    """The model a slim request on a group runs when it names none: the group's first model this client sees,
    else the first it may use (hidden models run when named); None when it may use none."""
    listed = visibility.listed_models(registry, group, who)
    usable = [m for m in group.models if visibility.may_use(registry, m.id, who)]
    return (listed or usable)[0].id if usable else None


def slim_groups(registry: Registry, state: CatalogState, who: Identity) -> dict[str, Any]:
    """`GET /api/slim/models`: the groups this client may use and its current model."""
    return {
        "model_groups": [
            {
                "id": g.group_id,
                "name": g.group_name,
                "description": g.description,
                "is_loaded": g.group_id in state.on_device,
                "default_layer": default_model(registry, g, who),
            }
            for g in visibility.listed_groups(registry, who)
        ],
        "current_model_id": shown_current(registry, state, who),
    }


def slim_layers(
    registry: Registry, state: CatalogState, group: GroupEntry, default: str, who: Identity
) -> dict[str, Any]:
    """`GET /api/slim/models/{group_id}/layers`: the models (layers) of one group this client sees."""
    return {
        "group_id": group.group_id,
        "group_name": group.group_name,
        "is_loaded": group.group_id in state.on_device,
        "layers": [
            {
                "id": m.id,
                "name": m.name,
                "description": m.description,
                "layer": m.layer,
                "is_current": m.id == state.current,
            }
            for m in visibility.listed_models(registry, group, who)
        ],
        "default_layer": default,
    }


# -- one model, and memory ------------------------------------------------------------------------------------------
def model_info(
    registry: Registry,
    settings: Settings,
    state: CatalogState,
    model_id: str,
    *,
    load_error: str | None,
    nla: dict[str, Any] | None,
) -> dict[str, Any]:
    """`GET /api/v2/models/{id}/info`: the listing's facts of one model plus its settings and, once loaded, the
    NLA's own (`nla`, read by the caller from the loaded model)."""
    model = registry.model(model_id)
    group = registry.group(model.group_id)
    return {
        "model_id": model.id,
        "group_id": group.group_id,
        "group_name": group.group_name,
        "model_name": model.name,
        "description": model.description,
        "base_model": group.base_model_path,
        "layer": model.layer,
        "batch_size": _setting(registry, settings, "batch_size", model.id),
        "auto_batch_size_max": _setting(registry, settings, "auto_batch_size_max", model.id),
        "is_loaded": model.id in state.loaded_models,
        "is_current": model.id == state.current,
        "location": state.location(group.group_id),
        "visible": model.visible and group.visible,
        "backend_only": visibility.backend_only(registry, model.id),
        "generation_config": model.generation_config,
        "load_error": load_error,
        "nla": nla,
    }


def memory_view(registry: Registry, state: CatalogState, who: Identity) -> dict[str, Any]:
    """The catalogue half of `GET /api/v2/models/memory` (the device figures are the caller's)."""
    info = cache_info(registry, state, who)
    current = shown_current(registry, state, who)
    return {
        "cache_info": {
            "groups_loaded": info["groups_loaded"],
            "models_cached": info["models_cached"],
            "base_model_cache": info["base_locations"],
        },
        "current_model": current,
        "current_group": group_of(registry, current),
    }
