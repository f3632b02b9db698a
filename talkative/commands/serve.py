"""`talkative serve`: run the analysis server under uvicorn (what `make run` calls).

Settings come from the environment, `.env` files and model_groups.json (see `talkative/serve/settings.py`);
`--host`, `--port` and `--log-level` override HOST, PORT and LOG_LEVEL. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="bind address (default: HOST, else 0.0.0.0)")
    p.add_argument("--port", type=int, help="listen port (default: PORT, else 8000)")
    p.add_argument(
        "--log-level", help="critical, error, warning, info or debug (default: LOG_LEVEL, else info)"
    )
    p.add_argument(
        "--model-groups", help="model groups file (default: MODEL_GROUPS_FILE, else ./model_groups.json)"
    )
    p.add_argument("--data-dir", help="job store directory (default: DATA_DIR, else ./data)")


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from ..serve.app import create_app
    from ..serve.registry import RegistryError
    from ..serve.settings import Settings

    overrides = {
        name: value
        for name, value in (
            ("host", args.host),
            ("port", args.port),
            ("log_level", args.log_level),
            ("model_groups_file", args.model_groups),
            ("data_dir", args.data_dir),
        )
        if value is not None
    }
    try:
        settings = Settings.load(**overrides)
    except ValidationError as exc:
        print(f"error: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    level = settings.log_level.upper() if settings.log_level != "trace" else "DEBUG"
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        app = create_app(settings)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )
    return 0
