"""The ingress deployment: the FastAPI app of `build_app(settings)`, served by Serve's proxy.

Each ingress replica builds the same app as `talkative serve` does locally (REST, SSE and the WebSocket protocol
unchanged), with BACKEND=ray so that its scheduler sends jobs to the worker deployments. The app is built in the
replica (`__serve_build_asgi_app__`), not pickled from the driver, and its lifespan (the store, the scheduler,
the hub) runs there: Serve runs an ingress app's lifespan on replica start and stop.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve

from ..app import build_app
from ..settings import Settings


@serve.ingress()
class Ingress:
    """One ingress replica; the worker deployments bound with it are reached by name (`wiring.py`)."""

    def __init__(self, settings: Settings, *workers: Any) -> None:
        self.settings = settings

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_app(self.settings)
