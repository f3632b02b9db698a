"""Small random-word corpora for the training tests: deterministic per document index, so splits and windows are
the same on every run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from talkative.nla.train.data import DataConfig

WORDS = [
    "the",
    "a",
    "river",
    "stone",
    "light",
    "city",
    "old",
    "young",
    "ran",
    "saw",
    "quiet",
    "loud",
    "green",
    "blue",
    "song",
    "road",
    "winter",
    "summer",
    "king",
]


def random_text(seed: int, words: int = 300, sentences: bool = False) -> str:
    """`words` words drawn with `seed`; with `sentences`, "the" opens a new sentence (some punctuation for the
    tokenizer to see)."""
    g = torch.Generator().manual_seed(seed)
    text = " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (words,), generator=g).tolist())
    return text.replace(" the ", ". The ") if sentences else text


def write_corpus(directory: Path, docs: int = 8, words: int = 300, sentences: bool = False) -> Path:
    """A `files:` corpus of `docs` documents doc0.txt.. of `random_text(d, words, sentences)`."""
    directory.mkdir(parents=True, exist_ok=True)
    for d in range(docs):
        (directory / f"doc{d}.txt").write_text(random_text(d, words, sentences))
    return directory


def tiny_data_config(corpus: Path, source: str, **kw: Any) -> DataConfig:
    """A dataset of a `files:` corpus small enough for a tiny model in a unit test (layer 1, 32-token windows,
    4 positions each, a quarter held out); `kw` overrides any field."""
    base: dict[str, Any] = dict(
        corpora=[f"files:{corpus}"],
        source=source,
        layer=1,
        window=32,
        context=32,
        positions_per_window=4,
        min_position=10,
        max_windows=40,
        max_windows_per_doc=5,
        heldout_fraction=0.25,
        batch_windows=4,
        shard_size=8,
        predictions=False,
    )
    base.update(kw)
    return DataConfig(**base)


def write_modern_records(path: Path, families: int = 8) -> None:
    """A modern-text JSONL (`talkative train modern`'s records) by hand: every family in three genres, then one
    exact and one near copy of earlier documents under new families."""
    recs = []
    for f in range(families):
        for g, genre in enumerate(("news", "recipe", "code")):
            text = random_text(100 * f + g, 220, sentences=True)
            recs.append(
                {
                    "id": f"{genre}/{f:03d}",
                    "genre": genre,
                    "family": f"topic:{f:03d}",
                    "reply": text,
                    "text": text,
                    "prompt": f"p{f}{g}",
                }
            )
    copy = dict(recs[0], id="news/900", family="topic:900")
    near = dict(recs[1], id="recipe/901", family="topic:901")
    near["reply"] = near["text"] = near["text"].replace("stone", "pebble", 3)
    recs += [copy, near]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
