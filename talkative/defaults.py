"""Where the default NLA comes from.

The trained demo checkpoint for the bundled SmolLM2 lives in the repository's `checkpoints/` directory; until it
exists, the default is an untrained NLA at layer 20 of the bundled model (it already behaves like a Patchscope).
"""

from __future__ import annotations

import os
from pathlib import Path

from .nla.sources import DEFAULT_SOURCE

DEFAULT_LAYER = 12  # the demo checkpoint's layer: the untrained fallback explains the same one
DEMO_CHECKPOINT_NAME = "smollm2-135m-l12-v2"


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def checkpoints_dir() -> Path:
    return Path(os.environ.get("TALKATIVE_CHECKPOINTS", repo_root() / "checkpoints"))


def demo_checkpoint() -> Path | None:
    """The committed trained checkpoint, if this checkout has one."""
    path = checkpoints_dir() / DEMO_CHECKPOINT_NAME
    return path if (path / "nla.json").is_file() else None


def default_checkpoint_spec() -> str:
    """A checkpoint path, or `init:SOURCE@LAYER` for an untrained NLA when no trained one is present."""
    demo = demo_checkpoint()
    return str(demo) if demo is not None else f"init:{DEFAULT_SOURCE}@{DEFAULT_LAYER}"
