"""What Talkative needs to know about one on-disk checkpoint format: how to recognise, load, describe and write it.

Each format module (`native`, `official`, `upstream`) builds one `CheckpointFormat` from its own functions and
`formats/__init__.py` lists them; `load_nla`, `talkative inspect` and `talkative convert` only ever iterate that
list. A new format is one module with its `CheckpointFormat`, added to the list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..checkpoint import NLA
    from ..lm import LMPool


class Load(Protocol):
    """Read a checkpoint of the format. Options a format does not use (another format's) are ignored, so that one
    call site serves every format: `fve_variance` (the FVE baseline), `base_override`, `max_new_tokens`..."""

    def __call__(
        self,
        path: Path,
        *,
        pool: LMPool,
        subject_override: str | None = None,
        trust_checkpoint: bool = False,
        **options: Any,
    ) -> NLA: ...


class Describe(Protocol):
    """What `talkative inspect` prints, read from the checkpoint's own files without loading any model.
    `trust` allows unpickling a file that needs it (formats that unpickle nothing ignore it)."""

    def __call__(self, path: Path, *, trust: bool = False) -> dict[str, Any]: ...


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    expects: str  # what a directory of this format holds, for the message when a path holds no checkpoint
    detect: Callable[[Path], bool]  # whether an existing path holds a checkpoint of this format
    load: Load
    describe: Describe
    save: Callable[[NLA, Path], Path] | None = None  # None: Talkative does not write this format
    file_hint: str | None = (
        None  # the one file that is a checkpoint of it ("a native nla.json"); None: dirs only
    )
    base_by_id: bool = False  # names its base model by an id that a local copy may replace (`convert --base`)
    holds_bases: bool = False  # a checkpoint directory can hold its base models next to its tensors
    # converting out of this format into one that holds bases: bring the bases along (NLA, OUT, link mode)
    carry_bases: Callable[[NLA, Path, str], None] | None = None
