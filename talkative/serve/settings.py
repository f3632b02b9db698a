"""Server settings: the seed's variable names plus our own, with one documented precedence.

Highest first:

1. the process environment;
2. `.env` in the working directory;
3. `.env` at the repository root;
4. `settings` in `model_groups.json` (keys named like the fields below, plus the seed's `max_cpu_models`);
5. the defaults below.

Per-model settings (`use_bf16, no_orig, no_kl, batch_size, auto_batch_size_max, comparison_tl_checkpoint,
preload_groups`) have their own chain, resolved by `registry.Registry.model_setting`:
`MODEL_<model_id>_<SETTING>` > `MODEL_GROUP_<group_id>_<SETTING>` > `GLOBAL_<SETTING>` (each from the same three
environment layers) > the model's own key in the JSON > the group's key > JSON `settings.<setting>` > default.
Any environment value beats any file value, so `GLOBAL_BATCH_SIZE=48` really overrides a JSON `batch_size`.
`no_orig` is accepted and has no effect (`INERT_SETTINGS`): refusing it would refuse the seed's own files.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from dotenv import dotenv_values
from pydantic import Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from ..defaults import repo_root
from .jobs.database import check_url

#: settings that `MODEL_<id>_*`, `MODEL_GROUP_<gid>_*`, `GLOBAL_*` and the JSON may set per model or group
MODEL_SETTINGS = (
    "use_bf16",
    "no_orig",
    "no_kl",
    "batch_size",
    "auto_batch_size_max",
    "comparison_tl_checkpoint",
    "preload_groups",
)
#: per-model settings accepted (the seed's `model_groups.json` and environment carry them) and read by nothing,
#: with the reason; docs/server.md lists them as having no effect
INERT_SETTINGS = {
    "no_orig": "the seed's switch for sharing the base model between a group's models; the bases of a group are "
    "always shared through its pool here",
}
#: JSON `settings` keys that feed a differently named field
JSON_ALIASES = {"max_cpu_models": "max_cpu_cached_models"}


def env_layers(cwd: Path | None = None) -> list[dict[str, str]]:
    """The three environment layers, lowest precedence first: repo-root `.env`, cwd `.env`, the process."""
    root_env = repo_root() / ".env"
    cwd_env = (cwd or Path.cwd()) / ".env"
    layers: list[dict[str, str]] = []
    for path in (root_env, cwd_env):
        if path.is_file():
            layers.append({k: v for k, v in dotenv_values(path).items() if v is not None})
        else:
            layers.append({})
    layers.append(dict(os.environ))
    return layers


def merged_environment(cwd: Path | None = None) -> dict[str, str]:
    out: dict[str, str] = {}
    for layer in env_layers(cwd):
        out.update(layer)
    return out


def _split(v: Any) -> Any:
    if isinstance(v, str):
        return [part.strip() for part in v.split(",") if part.strip()]
    return v


class JsonGroupsSettings(PydanticBaseSettingsSource):
    """`settings` of model_groups.json, below every environment layer."""

    def __init__(self, settings_cls: type[BaseSettings], init_kwargs: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._init = init_kwargs

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = self._init.get("model_groups_file")
        if path is None:
            env = {k.upper(): v for k, v in merged_environment().items()}
            path = env.get("MODEL_GROUPS_FILE")
        path = Path(path) if path else default_model_groups_file()
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError):
            return {}  # the registry reports an unreadable file with its path; settings just skip it
        raw = data.get("settings") if isinstance(data, dict) else None
        if not isinstance(raw, dict):
            return {}
        fields = self.settings_cls.model_fields
        out: dict[str, Any] = {}
        for key, value in raw.items():
            name = JSON_ALIASES.get(key, key)
            if name in fields and name not in MODEL_SETTINGS:
                out[name] = value
        return out


def default_model_groups_file() -> Path:
    return repo_root() / "model_groups.json"


class Settings(BaseSettings):
    """Every knob of the server; field names are the environment variable names (case-insensitive)."""

    model_config = SettingsConfigDict(
        extra="ignore",
        case_sensitive=False,
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        # a refused value is never echoed: API keys and DATABASE_URL's password must not reach a terminal or a log
        hide_input_in_errors=True,
    )

    # -- models ---------------------------------------------------------------------------------------------------
    model_groups_file: Path = Field(
        default_factory=default_model_groups_file, description="The model catalogue (seed schema)."
    )
    default_group: str | None = Field(
        None, description="Group loaded at startup; beats settings.default_group of the JSON."
    )
    lazy_load_model: bool = Field(False, description="Load the default group on first use, not at startup.")
    max_cpu_cached_models: int = Field(
        2, ge=0, description="Groups kept in the CPU cache after leaving a device (JSON: max_cpu_models)."
    )
    tuned_lens_dir: str | None = Field(
        None, description="Tuned lenses: <dir>/<group_id>/params.pt or <dir>/params.pt."
    )
    devices: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma list of devices; default cuda:0 with CUDA, else cpu."
    )
    device: str | None = Field(None, description="Single-device form of DEVICES (legacy).")
    num_workers_per_gpu: int = Field(1, ge=1, le=16, description="Engine batches in flight per device.")
    torch_threads: int = Field(
        0,
        ge=0,
        description="CPU threads torch uses in each serving process (a worker replica, or the local server); 0: "
        "torch's default, one per core. Set 1 when several CPU replicas share a machine, so they do not compete.",
    )

    # -- per-model defaults at the GLOBAL_ level --------------------------------------------------------------------
    global_use_bf16: bool | Literal["auto"] | None = None
    global_no_orig: bool | None = None
    global_no_kl: bool | None = None
    global_batch_size: int | None = Field(None, ge=1)
    global_auto_batch_size_max: int | None = Field(None, ge=1)
    global_comparison_tl_checkpoint: str | None = None
    global_preload_groups: bool | None = None
    global_max_cpu_models: int | None = Field(None, ge=0)

    # -- requests -------------------------------------------------------------------------------------------------
    max_queue_size: int = Field(100, ge=1, description="Queued plus running jobs; more is refused with 503.")
    max_text_length: int = Field(20000, ge=1, description="Longest text (characters) an analysis accepts.")
    max_tokens: int = Field(4096, ge=1, description="Longest input (tokens) an analysis accepts.")
    request_timeout: float = Field(
        300,
        ge=0,
        description="Seconds of its own engine time a job may use (its preparation and batches, not time waiting "
        "for a worker); 0 = no limit. Checked every second and inside engine calls, which then stop.",
    )
    row_token_budget: int = Field(
        8192,
        ge=64,
        description="Rows × tokens one engine forward may hold (verbalizer, reconstructor and salience passes are "
        "split to fit): bounds an analysis's memory whatever its explanations' length.",
    )
    max_active_jobs: int = Field(
        8, ge=1, description="Jobs prepared and interleaved at once per device; the rest wait queued."
    )
    fill_finishing_batches: bool | None = Field(
        None,
        description="Fill a batch that completes a job with chunks of jobs it does not complete; default: on "
        "GPUs yes, on the CPU no (engine time grows with rows there, so padding only delays the finishing job).",
    )

    # -- batch jobs (docs/server.md, Batches) ----------------------------------------------------------------------
    max_batch_items: int = Field(10000, ge=1, description="Items one batch may hold; more get 413.")
    max_batch_bytes: int = Field(
        64 * 1_048_576,
        ge=1024,
        description="Largest body of POST /api/v1/batches (a JSON list or a JSONL upload, read into memory); more "
        "get 413. Every other body stays within MAX_REQUEST_BYTES.",
    )
    max_batches_in_flight: int = Field(
        4, ge=1, description="Unfinished batches per key (or IP); another one gets 429."
    )
    max_active_batch_jobs: int = Field(
        2,
        ge=1,
        description="Batch items admitted at once per device, on top of MAX_ACTIVE_JOBS interactive jobs: a batch "
        "takes only what interactive requests leave, so they keep their latency.",
    )

    # -- storage --------------------------------------------------------------------------------------------------
    data_dir: Path = Field(Path("data"), description="Job store (jobs.sqlite3) lives here.")
    database_url: str = Field(
        "",
        repr=False,  # it may hold a password
        description="The job store's database: empty = the SQLite file DATA_DIR/jobs.sqlite3; "
        "postgresql://user:password@host:port/database = a PostgreSQL store that several ingress replicas share. "
        "Other schemes are refused at startup.",
    )
    database_pool_size: int = Field(
        8, ge=1, description="Most connections to PostgreSQL this process opens (the stores share them)."
    )
    result_retention_days: float = Field(7, gt=0, description="Finished jobs are purged after this long.")
    purge_interval_seconds: float = Field(3600, gt=0)

    # -- result cache and shares (docs/server.md, Result cache; docs/api.md, Shares) -----------------------------
    result_cache: bool = Field(
        True, description="Answer rows already computed from the store (same NLA, prefix, options and seed)."
    )
    result_cache_max_mb: float = Field(
        1024, gt=0, description="Bound of the result cache in the store; least recently used rows go first."
    )
    result_cache_shared: bool = Field(
        False,
        description="Share cached rows between clients (keys); off, each client's cache is its own, so a fast "
        "answer never tells one client what another analysed.",
    )
    public_shares: bool = Field(
        False,
        description="Shares (/s/{id}, GET /api/v1/shares/{id}) open to anyone with the link, without a key.",
    )

    # -- cluster (BACKEND=ray; docs/deploy.md) --------------------------------------------------------------------
    backend: Literal["local", "ray"] = Field(
        "local",
        description="local: one process runs everything (the default); ray: the API is a Ray Serve ingress and the "
        "engines are worker deployments on a Ray cluster.",
    )
    ray_address: str | None = Field(
        None,
        description="With BACKEND=ray, the Ray cluster to join (ray://… or host:port); empty: start a local one.",
    )
    ingress_replicas: int = Field(1, ge=1, description="With BACKEND=ray, replicas of the ingress (the API).")
    lease_seconds: float = Field(
        10.0,
        gt=0,
        description="With BACKEND=ray, how long an ingress's claim on a job lasts without renewal (renewed every "
        "third of it); a job whose ingress died is another's to run after this.",
    )

    # -- HTTP -----------------------------------------------------------------------------------------------------
    host: str | None = Field(
        None,
        description="Bind address; default 0.0.0.0 with API keys or ALLOW_UNAUTHENTICATED, else 127.0.0.1 (a keyless "
        "server serves only its own machine, and refuses to start on a non-loopback HOST).",
    )
    port: int = Field(8000, ge=0, le=65535)
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["http://localhost:3000"],
        description="CORS origins, comma list or *; localhost origins are added unless *.",
    )
    enable_docs: bool = Field(True, description="Serve /docs and /redoc (the OpenAPI explorer).")
    api_key: str | None = Field(
        None, repr=False, description="Bearer key required on every API route when set (its name: admin)."
    )
    rate_limit_per_minute: int = Field(
        60,
        ge=0,
        description="REST requests plus WebSocket messages per minute per key (or IP); 0 = no limit.",
    )
    environment: str = "development"
    log_level: str = "info"
    queue_update_interval: float = Field(2.0, gt=0, description="Seconds between periodic queue_update.")
    ws_send_timeout: float = Field(
        10.0, gt=0, description="A WebSocket send slower than this drops the client."
    )
    header_timeout: float = Field(
        10.0, gt=0, description="Seconds a request's headers may take to arrive; slower clients get 408."
    )
    trusted_proxy_header: Literal["x-forwarded-for", "x-real-ip", "forwarded", "none"] = Field(
        "x-forwarded-for",
        description="The header that names the client behind a reverse proxy (docs/security.md); a request with "
        "any proxy header is never taken for a local client.",
    )

    # -- security, limits and observability (docs/security.md) --------------------------------------------------
    api_keys: str | None = Field(
        None,
        repr=False,
        description="Several keys as name:key pairs, comma separated; the key named admin is admin.",
    )
    allow_unauthenticated: bool = Field(
        False, description="Without a key, serve non-loopback clients too (else they get 403)."
    )
    enable_trusted_host: bool | None = Field(
        None,
        description="Check the Host header against ALLOWED_HOSTS; default: on when serving without a key.",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1", "::1"],
        description="Host names the server answers to (comma list; *.example.org and * allowed).",
    )
    max_jobs_per_client: int = Field(
        16, ge=0, description="Queued plus running requests per key (or IP); more get 429; 0 = no cap."
    )
    max_request_bytes: int = Field(1_048_576, ge=1024, description="Largest HTTP request body; more get 413.")
    max_ws_message_bytes: int = Field(
        1_048_576, ge=1024, description="Largest WebSocket message answered; more get an error frame."
    )
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per log line.")
    drain_timeout: float = Field(
        30, ge=0, description="On SIGTERM, seconds to wait for running engine batches before exiting."
    )

    #: MODEL_*/MODEL_GROUP_*/GLOBAL_* variables; None = read the environment layers (tests pass a dict)
    env_overrides: dict[str, str] | None = Field(None, exclude=True)

    @field_validator("devices", "allowed_origins", "allowed_hosts", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        return _split(v)

    @field_validator(
        "api_key",
        "api_keys",
        "tuned_lens_dir",
        "default_group",
        "device",
        "host",
        "ray_address",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("log_format", "trusted_proxy_header", "backend", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.lower()
        if v not in {"critical", "error", "warning", "info", "debug", "trace"}:
            raise ValueError("LOG_LEVEL must be one of critical, error, warning, info, debug, trace")
        return v

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, v: str) -> str:
        return check_url(v)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # the JSON source reads the model_groups.json that an explicit argument (the CLI's) names, if any
        init_kwargs = init_settings.init_kwargs if isinstance(init_settings, InitSettingsSource) else {}
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            JsonGroupsSettings(settings_cls, init_kwargs),
        )

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Read the environment layers (process > cwd .env > repo .env) and the JSON settings."""
        root_env = repo_root() / ".env"
        cwd_env = Path.cwd() / ".env"
        return cls(_env_file=(root_env, cwd_env), **overrides)  # later files win

    # -- derived --------------------------------------------------------------------------------------------------
    def resolved_devices(self) -> list[str]:
        if self.devices:
            return list(dict.fromkeys(self.devices))
        import torch

        if self.device:
            dev = self.device
            return ["cuda:0" if dev == "cuda" else dev]
        return ["cuda:0"] if torch.cuda.is_available() else ["cpu"]

    def cors_origins(self) -> list[str]:
        if "*" in self.allowed_origins:
            return ["*"]
        extra = [
            f"{scheme}://{host}:{port}"
            for scheme in ("http", "https")
            for host in ("localhost", "127.0.0.1")
            for port in (3000, 3001, 8000, 8001, self.port)
        ]
        return list(dict.fromkeys([*self.allowed_origins, *extra]))

    @cached_property
    def environment_overrides(self) -> dict[str, str]:
        """MODEL_*, MODEL_GROUP_* and GLOBAL_* variables of the three environment layers (upper-case keys)."""
        env = self.env_overrides if self.env_overrides is not None else merged_environment()
        return {
            k.upper(): v
            for k, v in env.items()
            if k.upper().startswith(("MODEL_", "GLOBAL_")) and k.upper() != "MODEL_GROUPS_FILE" and v != ""
        }

    def bind_host(self) -> str:
        """HOST, else every interface when clients are authenticated (or ALLOW_UNAUTHENTICATED says everyone may
        come), else loopback: a keyless server serves only its own machine, so it need not listen further."""
        if self.host:
            return self.host
        return "0.0.0.0" if self.api_key or self.api_keys or self.allow_unauthenticated else "127.0.0.1"

    def store_path(self) -> Path:
        return Path(self.data_dir) / "jobs.sqlite3"
