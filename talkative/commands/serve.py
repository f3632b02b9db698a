"""`talkative serve`: run the analysis server under uvicorn (what `make run` calls).

Settings come from the environment, `.env` files and model_groups.json (see `talkative/serve/settings.py`);
`--host`, `--port` and `--log-level` override HOST, PORT and LOG_LEVEL. Logs go to stderr. `--backend ray`
(BACKEND) serves the same API from a Ray cluster instead (`talkative/serve/cluster/deploy.py`): Serve's proxy on
HOST:PORT, the app as its ingress, the engines as worker deployments.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host",
        help="bind address (default: HOST, else 0.0.0.0 with API keys or ALLOW_UNAUTHENTICATED, else 127.0.0.1)",
    )
    p.add_argument("--port", type=int, help="listen port (default: PORT, else 8000)")
    p.add_argument(
        "--log-level", help="critical, error, warning, info or debug (default: LOG_LEVEL, else info)"
    )
    p.add_argument(
        "--model-groups", help="model groups file (default: MODEL_GROUPS_FILE, else ./model_groups.json)"
    )
    p.add_argument("--data-dir", help="job store directory (default: DATA_DIR, else ./data)")
    p.add_argument(
        "--backend",
        choices=("local", "ray"),
        help="local: this process runs everything; ray: a Ray Serve cluster, joined at RAY_ADDRESS or started "
        "here (default: BACKEND, else local)",
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from ..serve.app import create_app
    from ..serve.auth.policy import KeyRing, SecurityConfigError, startup_refusal
    from ..serve.catalog.registry import RegistryError
    from ..serve.lifecycle import DrainingServer
    from ..serve.observability.logs import configure_logging
    from ..serve.protocols import Utf8CheckedWebSocketProtocol, header_timeout_protocol
    from ..serve.settings import Settings

    overrides = {
        name: value
        for name, value in (
            ("host", args.host),
            ("port", args.port),
            ("log_level", args.log_level),
            ("model_groups_file", args.model_groups),
            ("data_dir", args.data_dir),
            ("backend", args.backend),
        )
        if value is not None
    }
    try:
        settings = Settings.load(**overrides)
    except ValidationError as exc:
        print(f"error: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings)  # LOG_FORMAT, request ids, keys scrubbed; uvicorn's loggers included
    try:
        refusal = startup_refusal(settings, KeyRing.from_settings(settings))
        if refusal is not None:
            print(f"error: {refusal}", file=sys.stderr)
            return 2
        if settings.backend == "ray":
            from ..serve.cluster.deploy import application, serve_forever

            application(settings)  # a bad model_groups.json or pool setting stops here, before any cluster
            return serve_forever(settings)
        app = create_app(settings)
    except (RegistryError, SecurityConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.bind_host(),
        port=settings.port,
        # X-Forwarded-For is resolved by uvicorn (from FORWARDED_ALLOW_IPS) only when it is the trusted header;
        # X-Real-IP and Forwarded are resolved by the guard (security.client_address)
        proxy_headers=settings.trusted_proxy_header == "x-forwarded-for",
        # uvicorn never times out a request whose headers trickle in; this protocol does (HEADER_TIMEOUT)
        http=header_timeout_protocol(settings.header_timeout),
        ws=Utf8CheckedWebSocketProtocol,  # invalid UTF-8 gets an error message, not a logged traceback
        log_level=settings.log_level,
        log_config=None,  # configure_logging did it
        access_log=False,  # the app writes its own access lines, with request ids
        timeout_graceful_shutdown=5,
        # frames beyond 4x MAX_WS_MESSAGE_BYTES close the connection (1009); below that the app answers an error
        ws_max_size=4 * settings.max_ws_message_bytes,
    )
    DrainingServer(config, app, settings.drain_timeout).run()  # SIGTERM drains first (serve/lifecycle.py)
    return 0
