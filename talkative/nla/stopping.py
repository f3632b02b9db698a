"""Stopping engine work early: the callable a caller hands to long engine calls, and what they raise.

A request's time limit or its cancellation is only worth something if the work it started stops too: an engine
call can run for minutes (a free-length verbalizer decodes hundreds of steps; salience ablates every explanation
token). Every long loop therefore takes a `Check` — a plain callable passed in explicitly, never a global — and
asks it between steps; when it answers True the call raises `Cancelled` and nothing partial is returned.
"""

from __future__ import annotations

from collections.abc import Callable

Check = Callable[[], bool]


class Cancelled(Exception):
    """The caller asked to stop; no partial result is kept."""


def stop_if(cancelled: Check | None) -> None:
    """Raise `Cancelled` when the caller's check says so (a None check never stops)."""
    if cancelled is not None and cancelled():
        raise Cancelled()
