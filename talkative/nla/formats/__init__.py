"""The checkpoint formats, as data: one `CheckpointFormat` per module, in the order paths are recognised.

The order matters only where two formats could claim a path: a directory with `nla.json` is native even if it
also holds `.pt` files, and an official pair's sidecar wins over stray `.pt` files, so upstream comes last.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import CheckpointError
from . import native, official, upstream
from .spec import CheckpointFormat

FORMATS: tuple[CheckpointFormat, ...] = (native.SPEC, official.SPEC, upstream.SPEC)


def format_of(path: str | Path) -> CheckpointFormat:
    """The format of the checkpoint at `path`, or CheckpointError saying what was expected there."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    for fmt in FORMATS:
        if fmt.detect(p):
            return fmt
    if p.is_file():
        hints = ", ".join(f"not {f.file_hint}" for f in FORMATS if f.file_hint)
        raise CheckpointError(f"{p} is a file but no checkpoint file: {hints}")
    expected = [f.expects for f in FORMATS]
    raise CheckpointError(f"{p} holds no checkpoint: expected {', '.join(expected[:-1])} or {expected[-1]}")


def named(name: str) -> CheckpointFormat:
    """The format called `name` (as `detect_format` and `convert --to` spell it)."""
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise CheckpointError(f"unknown checkpoint format {name!r} ({', '.join(f.name for f in FORMATS)})")


def writable() -> list[str]:
    """The formats Talkative writes (`convert --to`)."""
    return [f.name for f in FORMATS if f.save is not None]
