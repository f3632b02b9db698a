"""Activation datasets: corpora → token windows → the subject's layer-L residual at sampled positions → shards.

Each sample keeps the activation (fp32), the last `context` tokens up to and including its position, the
subject's top-3 next-token predictions there, its norm, and where it came from. Positions before `min_position`
are never sampled (the first token of a window is an attention sink with a norm ~100× the rest, and early
positions have too little context), nor are positions whose norm is an outlier within their window.

Documents are split into train / held-out by a hash of their id, so the split is disjoint by document and stable.
Shards are written atomically and the run resumes from the last complete shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .. import metrics as M
from ..lm import LM
from .corpora import Document, documents, provenance

OUTLIER_FACTOR = 5.0


@dataclass
class DataConfig:
    corpora: list[str] = field(default_factory=lambda: ["shakespeare", "python-docs"])
    source: str = "bundled:smollm2-135m-instruct"
    layer: int = 20
    window: int = 128
    context: int = (
        128  # tokens kept per sample, up to and including its position (the whole window: KL needs it)
    )
    positions_per_window: int = 4
    min_position: int = 24
    max_windows_per_doc: int = 64
    max_windows: int = 8000
    heldout_fraction: float = 0.1
    seed: int = 0
    dtype: str = "float32"
    predictions: bool = True  # also store the subject's top-3 next tokens (runs every block, not just 0..L)
    batch_windows: int = 8
    shard_size: int = 1024  # windows per chunk (one shard per split)


@dataclass
class Window:
    doc_index: int
    split: str
    ids: list[int]
    positions: list[int]


def _unit_hash(doc_id: str, seed: int) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}|{doc_id}".encode()).digest()[:8], "little") / 2**64


def assign_splits(docs: list[Document], seed: int, heldout_fraction: float) -> dict[str, str]:
    """Held-out documents by hash; every corpus with two or more documents holds out at least one."""
    splits = {
        d.doc_id: ("heldout" if _unit_hash(d.doc_id, seed) < heldout_fraction else "train") for d in docs
    }
    by_corpus: dict[str, list[Document]] = {}
    for d in docs:
        by_corpus.setdefault(d.corpus, []).append(d)
    for items in by_corpus.values():
        if heldout_fraction > 0 and len(items) >= 2 and all(splits[d.doc_id] == "train" for d in items):
            splits[min(items, key=lambda d: _unit_hash(d.doc_id, seed)).doc_id] = "heldout"
    return splits


def _windows(cfg: DataConfig, docs: list[Document], lm: LM) -> Iterator[Window]:
    """Deterministic windows, round-robin over corpora and, within a corpus, over documents, so a run cut at
    `max_windows` still covers every corpus and document (held-out ones included)."""
    splits = assign_splits(docs, cfg.seed, cfg.heldout_fraction)
    per_corpus: dict[str, list[Iterator[Window]]] = {}
    for i, d in enumerate(docs):
        per_corpus.setdefault(d.corpus, []).append(_doc_windows(cfg, i, d, lm, splits[d.doc_id]))
    yield from _round_robin([_round_robin(its) for its in per_corpus.values()])


def _round_robin(iters: list[Iterator[Window]]) -> Iterator[Window]:
    while iters:
        alive = []
        for it in iters:
            w = next(it, None)
            if w is not None:
                yield w
                alive.append(it)
        iters = alive


def _doc_windows(cfg: DataConfig, doc_index: int, doc: Document, lm: LM, split: str) -> Iterator[Window]:
    ids = list(lm.tokenizer(doc.text, add_special_tokens=False)["input_ids"])
    starts = list(range(0, len(ids) - cfg.window + 1, cfg.window))[: cfg.max_windows_per_doc]
    for start in starts:
        rng = random.Random(f"{cfg.seed}|{doc.doc_id}|{start}")
        choices = list(range(cfg.min_position, cfg.window))
        positions = sorted(rng.sample(choices, min(cfg.positions_per_window, len(choices))))
        yield Window(doc_index, split, ids[start : start + cfg.window], positions)


def extract_batch(
    lm: LM, layer: int, windows: list[Window], context: int, predictions: bool = True
) -> list[dict[str, Any]]:
    """One forward over equal-length windows: activations after block `layer` (and next-token top-3, or -1s)."""
    ids = torch.tensor([w.ids for w in windows], dtype=torch.long, device=lm.device)
    pos = torch.arange(ids.shape[1], device=lm.device).unsqueeze(0).expand(ids.shape[0], -1)
    captured: dict[str, Tensor] = {}

    def capture(i: int, h: Tensor) -> Tensor:
        if i == layer + 1:
            captured["h"] = h
        return h

    with torch.no_grad():
        stop = None if predictions else layer + 1
        out = lm.forward(lm.add_positions(lm.embed(ids), pos), pos, stop=stop, patch=capture)
        acts = captured.get("h", out).float()
        samples = []
        for b, w in enumerate(windows):
            norms = acts[b].norm(dim=-1)
            med = float(norms[1:].median())
            keep = [p for p in w.positions if float(norms[p]) <= OUTLIER_FACTOR * med]
            if not keep:
                continue
            if predictions:
                top = lm.logits(lm.final_norm(out[b, keep])).float().topk(3, dim=-1).indices
            else:
                top = torch.full((len(keep), 3), -1, dtype=torch.long)
            for j, p in enumerate(keep):
                ctx = w.ids[max(0, p - context + 1) : p + 1]
                ctx = [-1] * (context - len(ctx)) + ctx
                samples.append(
                    {
                        "act": acts[b, p].cpu(),
                        "ctx": ctx,
                        "pos": p,
                        "doc": w.doc_index,
                        "top": top[j].tolist(),
                        "norm": float(norms[p]),
                    }
                )
    return samples


def _write_shard(path: Path, samples: list[dict[str, Any]]) -> None:
    tensors = {
        "acts": torch.stack([s["act"] for s in samples]).float().contiguous(),
        "ctx": torch.tensor([s["ctx"] for s in samples], dtype=torch.int32),
        "pos": torch.tensor([s["pos"] for s in samples], dtype=torch.int32),
        "doc": torch.tensor([s["doc"] for s in samples], dtype=torch.int32),
        "top": torch.tensor([s["top"] for s in samples], dtype=torch.int32),
        "norm": torch.tensor([s["norm"] for s in samples], dtype=torch.float32),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".shard-", dir=path.parent)
    os.close(fd)
    save_file(tensors, tmp)
    os.replace(tmp, path)


def build_dataset(cfg: DataConfig, lm: LM, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Extract a train / held-out activation dataset into `out`.

    Windows are processed in chunks of `shard_size` windows; each chunk becomes one shard per split, written
    atomically, and a chunk whose shards exist is skipped, so a killed run resumes where it stopped.
    """
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    docs: list[Document] = []
    for spec in cfg.corpora:
        docs.extend(documents(spec))
    windows = list(_limit(_windows(cfg, docs, lm), cfg.max_windows))
    bar = tqdm(total=len(windows), desc="extracting activations", unit="win", disable=not progress)
    for c, start in enumerate(range(0, len(windows), cfg.shard_size)):
        chunk = windows[start : start + cfg.shard_size]
        marker = out / "chunks" / f"{c:05d}.done"
        if marker.is_file():
            bar.update(len(chunk))
            continue
        groups: dict[str, list[dict[str, Any]]] = {"train": [], "heldout": []}
        for b in range(0, len(chunk), cfg.batch_windows):
            batch = chunk[b : b + cfg.batch_windows]
            for split, samples in _split_samples(
                extract_batch(lm, cfg.layer, batch, cfg.context, cfg.predictions), batch
            ):
                groups[split].extend(samples)
            bar.update(len(batch))
        for split, samples in groups.items():
            if samples:
                _write_shard(out / split / f"shard-{c:05d}.safetensors", samples)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{len(chunk)} windows\n")
    bar.close()
    counts = {
        split: (len(ActivationSet(out / split)) if any((out / split).glob("shard-*")) else 0)
        for split in ("train", "heldout")
    }
    sidecar: dict[str, Any] = {
        "kind": "talkative_activations",
        "schema_version": 1,
        "model": cfg.source,
        "layer": cfg.layer,
        "d_model": lm.d_model,
        "config": asdict(cfg),
        "corpora": [provenance(s) for s in cfg.corpora],
        "positions": f"{cfg.positions_per_window} per {cfg.window}-token window at positions >= {cfg.min_position}, "
        f"norm outliers (> {OUTLIER_FACTOR}x the window median) skipped",
        "windows": len(windows),
        "counts": counts,
        "documents": [
            {"id": d.doc_id, "corpus": d.corpus, "split": s}
            for d, s in zip(docs, _splits_list(docs, cfg), strict=True)
        ],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for split in ("train", "heldout"):
        if counts[split]:
            sidecar[f"{split}_variance"] = M.normalized_variance(ActivationSet(out / split).acts)
    (out / "dataset.json").write_text(json.dumps(sidecar, indent=2))
    return sidecar


def _splits_list(docs: list[Document], cfg: DataConfig) -> list[str]:
    splits = assign_splits(docs, cfg.seed, cfg.heldout_fraction)
    return [splits[d.doc_id] for d in docs]


def _limit(it: Iterator[Window], n: int) -> Iterator[Window]:
    for i, w in enumerate(it):
        if i >= n:
            return
        yield w


def _split_samples(
    samples: list[dict[str, Any]], windows: list[Window]
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    split_of_doc = {w.doc_index: w.split for w in windows}
    groups: dict[str, list[dict[str, Any]]] = {"train": [], "heldout": []}
    for s in samples:
        groups[split_of_doc[s["doc"]]].append(s)
    yield from groups.items()


class ActivationSet:
    """All shards of one split (of one or several datasets), concatenated in memory (tens of MB for the demo)."""

    def __init__(self, directory: str | Path | list[str] | list[Path]) -> None:
        dirs = [Path(d) for d in directory] if isinstance(directory, list) else [Path(directory)]
        shards = [s for d in dirs for s in sorted(d.glob("shard-*.safetensors"))]
        if not shards:
            raise FileNotFoundError(f"no activation shards in {', '.join(map(str, dirs))}")
        parts = [load_file(str(s)) for s in shards]
        width = max(p["ctx"].shape[1] for p in parts)
        self.directories = dirs
        self.acts = torch.cat([p["acts"] for p in parts])
        self.ctx = torch.cat([_left_pad(p["ctx"].long(), width) for p in parts])
        self.pos = torch.cat([p["pos"] for p in parts]).long()
        self.doc = torch.cat([p["doc"] for p in parts]).long()
        self.top = torch.cat([p["top"] for p in parts]).long()
        self.norm = torch.cat([p["norm"] for p in parts])
        self.meta: dict[str, Any] = {}
        for d in dirs:
            meta = d.parent / "dataset.json"
            if meta.is_file():
                self.meta.setdefault("datasets", []).append(json.loads(meta.read_text()))
        if len(dirs) == 1 and self.meta.get("datasets"):
            self.meta.update(self.meta["datasets"][0])
        self.meta["train_variance"] = self.meta.get("train_variance") if len(dirs) == 1 else None

    def __len__(self) -> int:
        return int(self.acts.shape[0])

    @property
    def current(self) -> Tensor:
        """The token at each sample's position (the last context token)."""
        return self.ctx[:, -1]


def _left_pad(x: Tensor, width: int) -> Tensor:
    if x.shape[1] == width:
        return x
    return torch.cat([torch.full((x.shape[0], width - x.shape[1]), -1, dtype=x.dtype), x], dim=1)
