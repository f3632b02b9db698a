"""The model catalogue: `model_groups.json` in the seed's schema, and the per-model settings chain.

A group is the unit that shares one base model in memory; its models are NLAs (a checkpoint path of any format,
`init:SOURCE@LAYER` for an untrained one, or `default` for the repository's default checkpoint). The seed's model
key `lens_checkpoint_path` is accepted as well as `checkpoint`; keys we do not know (`OLD…`, `IGNORE…`,
`different_activations_orig_path` of a retired value, …) are ignored, as the seed's loaders must.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import TypeAdapter, ValidationError

from ...defaults import default_checkpoint_spec
from ...nla.loading import INIT_PREFIX, parse_init
from ..settings import MODEL_SETTINGS, default_model_groups_file

if TYPE_CHECKING:
    from ..settings import Settings

log = logging.getLogger("talkative.serve.catalog.registry")

DEFAULT_CHECKPOINT = "default"
SETTING_TYPES: dict[str, Any] = {
    "use_bf16": bool | Literal["auto"],
    "no_orig": bool,
    "no_kl": bool,
    "batch_size": int | None,
    "auto_batch_size_max": int,
    "comparison_tl_checkpoint": bool | str,
    "preload_groups": bool,
}
SETTING_DEFAULTS: dict[str, Any] = {
    # bfloat16 where the device computes it natively: the demo NLA's held-out FVE moves by under 0.001 in bf16
    # (docs/figures/speed-and-dtype-v2.json) while the engine runs 2.4x faster on such a CPU
    "use_bf16": "auto",
    "no_orig": True,
    "no_kl": False,
    "batch_size": None,
    "auto_batch_size_max": 256,
    "comparison_tl_checkpoint": False,
    "preload_groups": False,
}
DEFAULT_GENERATION_CONFIG = {"max_new_tokens": 100, "temperature": 1.0}


class RegistryError(ValueError):
    """model_groups.json is missing or malformed; the message names the file and the entry."""


class UnknownModel(KeyError):
    def __str__(self) -> str:
        return f"unknown model_id {self.args[0]!r}"


class UnknownGroup(KeyError):
    def __str__(self) -> str:
        return f"unknown group_id {self.args[0]!r}"


@dataclass(frozen=True)
class ModelEntry:
    id: str
    name: str
    group_id: str
    checkpoint: str  # a path, or init:SOURCE@LAYER
    layer: int | None
    description: str = ""
    batch_size: int | None = None
    auto_batch_size_max: int | None = None
    different_activations_orig_path: str | None = None
    visible: bool = True
    backend_only: bool = False
    generation_config: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # overridable keys set on the model itself


@dataclass(frozen=True)
class GroupEntry:
    group_id: str
    group_name: str
    base_model_path: str
    description: str
    visible: bool
    models: tuple[ModelEntry, ...]
    estimated_memory: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    backend_only: bool = False  # every model of the group is for the administrator only


def env_name(identifier: str) -> str:
    """How an id appears in MODEL_<id>_… and MODEL_GROUP_<id>_… names: every non-alphanumeric becomes `_`."""
    return re.sub(r"[^0-9A-Za-z]", "_", identifier).upper()


def parse_setting(name: str, value: Any) -> Any:
    if name == "comparison_tl_checkpoint" and isinstance(value, str):
        low = value.strip().lower()
        if low in {"", "false", "0", "no", "none", "off"}:
            return False
        if low in {"true", "1", "yes", "on"}:
            return True
        return value
    if name == "use_bf16" and isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if name == "batch_size" and isinstance(value, str) and value.strip().lower() in {"", "none", "auto"}:
        return None
    return TypeAdapter(SETTING_TYPES[name]).validate_python(value, strict=False)


class Registry:
    def __init__(
        self, groups: list[GroupEntry], json_settings: dict[str, Any], path: Path | None = None
    ) -> None:
        self.path = path
        self.groups: dict[str, GroupEntry] = {g.group_id: g for g in groups}
        self.models: dict[str, ModelEntry] = {m.id: m for g in groups for m in g.models}
        self.json_settings = json_settings
        self._env: dict[tuple[str, str, str], Any] = {}
        self.unmatched_overrides: list[str] = []

    # -- look-ups -------------------------------------------------------------------------------------------------
    def model(self, model_id: str) -> ModelEntry:
        try:
            return self.models[model_id]
        except KeyError:
            raise UnknownModel(model_id) from None

    def group(self, group_id: str) -> GroupEntry:
        try:
            return self.groups[group_id]
        except KeyError:
            raise UnknownGroup(group_id) from None

    def default_group(self, settings: Settings) -> str | None:
        """`DEFAULT_GROUP` (environment layers), else `settings.default_group` of the JSON, else none."""
        gid = settings.default_group
        if gid is None:
            return None
        if gid not in self.groups:
            raise RegistryError(
                f"default group {gid!r} is not in {self.path or 'the model groups'} "
                f"(groups: {', '.join(self.groups) or 'none'})"
            )
        return gid

    # -- settings -------------------------------------------------------------------------------------------------
    def bind_environment(self, overrides: dict[str, str]) -> None:
        """Parse MODEL_<id>_<SETTING> and MODEL_GROUP_<gid>_<SETTING>; bad values fail here, at startup."""
        models = {env_name(m): m for m in self.models}
        groups = {env_name(g): g for g in self.groups}
        suffixes = sorted((s.upper() for s in MODEL_SETTINGS), key=len, reverse=True)
        self._env = {}
        self.unmatched_overrides = []
        for key, raw in overrides.items():
            key = key.upper()
            if key.startswith("GLOBAL_") or not key.startswith("MODEL_"):
                continue
            hit = None
            for suffix in suffixes:
                if not key.endswith("_" + suffix):
                    continue
                middle = key[: -len(suffix) - 1]
                if middle.startswith("MODEL_GROUP_") and middle[len("MODEL_GROUP_") :] in groups:
                    hit = ("group", groups[middle[len("MODEL_GROUP_") :]], suffix.lower())
                elif middle[len("MODEL_") :] in models:
                    hit = ("model", models[middle[len("MODEL_") :]], suffix.lower())
                if hit:
                    break
            if hit is None:
                self.unmatched_overrides.append(key)
                continue
            try:
                self._env[hit] = parse_setting(hit[2], raw)
            except ValidationError as exc:
                raise RegistryError(f"{key}={raw!r}: {exc.errors()[0]['msg']}") from None
        for key in self.unmatched_overrides:
            log.warning("%s names no known model or group setting; it is ignored", key)

    def model_setting(
        self, settings: Settings, name: str, *, model_id: str | None = None, group_id: str | None = None
    ) -> Any:
        """The value of a per-model setting for a model (or a whole group when model_id is None)."""
        if name not in MODEL_SETTINGS:
            raise KeyError(name)
        model = self.model(model_id) if model_id is not None else None
        gid = model.group_id if model is not None else group_id
        group = self.group(gid) if gid is not None else None
        if model is not None and ("model", model.id, name) in self._env:
            return self._env[("model", model.id, name)]
        if group is not None and ("group", group.group_id, name) in self._env:
            return self._env[("group", group.group_id, name)]
        global_value = getattr(settings, f"global_{name}")
        if global_value is not None:
            return parse_setting(name, global_value)
        for layer in (model.settings if model else {}, group.settings if group else {}, self.json_settings):
            if layer.get(name) is not None:
                return parse_setting(name, layer[name])
        return SETTING_DEFAULTS[name]

    def max_cpu_groups(self, settings: Settings) -> int:
        """GLOBAL_MAX_CPU_MODELS > MAX_CPU_CACHED_MODELS (environment, else JSON max_cpu_models) > 2."""
        if settings.global_max_cpu_models is not None:
            return settings.global_max_cpu_models
        return settings.max_cpu_cached_models

    # -- description ----------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "file": str(self.path) if self.path else None,
            "groups": [
                {
                    "group_id": g.group_id,
                    "group_name": g.group_name,
                    "base_model": g.base_model_path,
                    "description": g.description,
                    "visible": g.visible,
                    "backend_only": g.backend_only,
                    "models": [
                        {
                            "id": m.id,
                            "name": m.name,
                            "layer": m.layer,
                            "checkpoint": m.checkpoint,
                            "description": m.description,
                            "visible": m.visible,
                            "backend_only": m.backend_only,
                        }
                        for m in g.models
                    ],
                }
                for g in self.groups.values()
            ],
            "settings": self.json_settings,
        }


# -- parsing ------------------------------------------------------------------------------------------------------
def _str(obj: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str) or not value:
        raise RegistryError(f"{where}: '{key}' must be a non-empty string")
    return value


def _resolve_checkpoint(spec: str, base: Path) -> str:
    if spec == DEFAULT_CHECKPOINT:
        return default_checkpoint_spec()
    if spec.startswith(INIT_PREFIX):
        source, _layer = parse_init(spec)
        if source.startswith(("./", "../")):
            return f"{INIT_PREFIX}{(base / source).resolve()}@{_layer}"
        return spec
    path = Path(spec).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _model(raw: Any, group_id: str, base: Path, where: str) -> ModelEntry:
    if not isinstance(raw, dict):
        raise RegistryError(f"{where}: a model must be an object")
    mid = _str(raw, "id", where)
    where = f"{where} model {mid!r}"
    spec = raw.get("checkpoint", raw.get("lens_checkpoint_path"))
    if not isinstance(spec, str) or not spec:
        raise RegistryError(f"{where}: needs 'checkpoint' (or the seed's 'lens_checkpoint_path')")
    checkpoint = _resolve_checkpoint(spec, base)
    layer = raw.get("layer")
    if layer is None and checkpoint.startswith(INIT_PREFIX):
        layer = parse_init(checkpoint)[1]
    if layer is not None and not isinstance(layer, int):
        raise RegistryError(f"{where}: 'layer' must be an integer")
    settings = {
        k: raw[k] for k in MODEL_SETTINGS if k in raw and k not in ("batch_size", "auto_batch_size_max")
    }
    try:
        batch_size = parse_setting("batch_size", raw.get("batch_size"))
        auto_max = raw.get("auto_batch_size_max")
        auto_max = None if auto_max is None else parse_setting("auto_batch_size_max", auto_max)
        for k, v in settings.items():
            settings[k] = parse_setting(k, v)
    except ValidationError as exc:
        raise RegistryError(f"{where}: {exc.errors()[0]['msg']}") from None
    if batch_size is not None:
        settings["batch_size"] = batch_size
    if auto_max is not None:
        settings["auto_batch_size_max"] = auto_max
    gen = raw.get("generation_config") or {}
    if not isinstance(gen, dict):
        raise RegistryError(f"{where}: 'generation_config' must be an object")
    return ModelEntry(
        id=mid,
        name=str(raw.get("name") or mid),
        group_id=group_id,
        checkpoint=checkpoint,
        layer=layer,
        description=str(raw.get("description") or ""),
        batch_size=batch_size,
        auto_batch_size_max=auto_max,
        different_activations_orig_path=raw.get("different_activations_orig_path"),
        visible=bool(raw.get("visible", True)),
        backend_only=bool(raw.get("backend_only", False)),
        generation_config={**DEFAULT_GENERATION_CONFIG, **gen},
        settings=settings,
    )


def parse_registry(data: Any, path: Path | None = None) -> Registry:
    where_file = str(path) if path else "model groups"
    base = path.parent if path else Path.cwd()
    if not isinstance(data, dict) or not isinstance(data.get("model_groups"), list):
        raise RegistryError(f"{where_file}: expected an object with a 'model_groups' list")
    json_settings = data.get("settings") or {}
    if not isinstance(json_settings, dict):
        raise RegistryError(f"{where_file}: 'settings' must be an object")
    estimates = json_settings.get("estimated_gpu_memory") or {}
    groups: list[GroupEntry] = []
    seen_models: set[str] = set()
    for i, g in enumerate(data["model_groups"]):
        if not isinstance(g, dict):
            raise RegistryError(f"{where_file}: model_groups[{i}] must be an object")
        gid = _str(g, "group_id", f"{where_file} model_groups[{i}]")
        where = f"{where_file} group {gid!r}"
        if any(x.group_id == gid for x in groups):
            raise RegistryError(f"{where}: duplicate group_id")
        raw_models = g.get("models")
        if not isinstance(raw_models, list) or not raw_models:
            raise RegistryError(f"{where}: 'models' must be a non-empty list")
        models = tuple(_model(m, gid, base, where) for m in raw_models)
        for m in models:
            if m.id in seen_models:
                raise RegistryError(
                    f"{where}: model id {m.id!r} is used twice (ids are unique across the file)"
                )
            seen_models.add(m.id)
        group_settings = {k: parse_setting(k, g[k]) for k in MODEL_SETTINGS if k in g}
        groups.append(
            GroupEntry(
                group_id=gid,
                group_name=str(g.get("group_name") or gid),
                base_model_path=str(g.get("base_model_path") or g.get("base_model") or ""),
                description=str(g.get("description") or ""),
                visible=bool(g.get("visible", True)),
                models=models,
                estimated_memory=g.get("estimated_memory") or estimates.get(gid),
                settings=group_settings,
                backend_only=bool(g.get("backend_only", False)),
            )
        )
    return Registry(groups, json_settings, path)


def load_registry(path: str | Path | None = None) -> Registry:
    p = Path(path) if path is not None else default_model_groups_file()
    try:
        data = json.loads(p.read_text())
    except OSError as exc:
        raise RegistryError(f"cannot read the model groups file {p}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{p} is not valid JSON: {exc}") from None
    return parse_registry(data, p)
