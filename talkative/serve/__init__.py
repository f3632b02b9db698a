"""The analysis server: REST and WebSocket APIs over a scheduler that interleaves and merges engine batches.

`create_app(settings)` (in `app.py`) builds the FastAPI app; `talkative serve` runs it under uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from .settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    from .app import create_app as _create

    return _create(settings)


__all__: list[Any] = ["create_app"]
