"""Activation datasets: corpora → token windows → the subject's layer-L residual at sampled positions → shards.

Each sample keeps the activation (fp32), the last `context` tokens up to and including its position, the
subject's top-3 next-token predictions there, its norm, and where it came from. Positions before `min_position`
are never sampled (the first token of a window is an attention sink with a norm ~100× the rest, and early
positions have too little context), nor are positions whose norm is an outlier within their window. A window
starts with the special tokens `analyze` puts before a text (the BOS of Llama-3 or Gemma), so training sees the
activations analysis computes.

The split into train / held-out must not leak text: documents with identical text are kept once (the `milton`
corpus ships every work under two file names), documents of one group (the replies to one chat prompt) and
documents whose windows share any 64-token shingle are split together, and each such component goes to one side
by a hash of its id, so the split is stable and no held-out window shares 64 tokens with a training window.
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

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .. import metrics as M
from ..explanations import CORPUS_GENRES
from ..lm import LM
from .corpora import Document, documents, provenance

OUTLIER_FACTOR = 5.0
SHINGLE = 64  # tokens: held-out and training windows never share a run this long
SCHEMA_VERSION = 2


class DatasetMismatch(ValueError):
    """A dataset that does not belong to the NLA (or to the other datasets) it is used with."""


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
    predictions: bool = True  # also store the subject's top next tokens (runs every block, not just 0..L)
    top_k: int = 3  # how many top next tokens to store (5 lets evaluation check "next likely" claims)
    batch_windows: int = 8
    shard_size: int = 1024  # windows per chunk (one shard per split)


@dataclass
class Window:
    doc_index: int
    split: str  # "train" or "heldout"; "" until the plan assigns it
    ids: list[int]
    positions: list[int]
    prefix: int = 0  # leading special tokens (BOS), not document text


@dataclass
class Plan:
    """What a dataset build extracts: the de-duplicated documents, the windows in order, and the split."""

    docs: list[Document]
    duplicates: dict[str, str]  # dropped doc_id -> the kept doc_id with the same text
    windows: list[Window]
    splits: dict[str, str]  # doc_id -> "train" | "heldout"
    components: dict[str, str]  # doc_id -> id of the set of documents split together
    prefix: list[int]  # special tokens before every window


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _unit_hash(doc_id: str, seed: int) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}|{doc_id}".encode()).digest()[:8], "little") / 2**64


def dedupe(docs: list[Document]) -> tuple[list[Document], dict[str, str]]:
    """Keep the first document of each text; a duplicate would be trained on twice or leak across the split."""
    kept: dict[str, Document] = {}
    dropped: dict[str, str] = {}
    for d in docs:
        h = content_hash(d.text)
        if h in kept:
            dropped[d.doc_id] = kept[h].doc_id
        else:
            kept[h] = d
    return list(kept.values()), dropped


def assign_splits(
    docs: list[Document], seed: int, heldout_fraction: float, components: dict[str, str] | None = None
) -> dict[str, str]:
    """Held-out components by a hash of their id; every corpus with two or more components holds out one.

    `components` maps each doc_id to the id of the documents it must share a side with (by default its
    `group`, or itself); a document alone keeps its own id, so its side does not depend on the others.
    """
    comp = components if components is not None else _group_components(docs)
    side = {c: ("heldout" if _unit_hash(c, seed) < heldout_fraction else "train") for c in set(comp.values())}
    by_corpus: dict[str, set[str]] = {}
    for d in docs:
        by_corpus.setdefault(d.corpus, set()).add(comp[d.doc_id])
    for comps in by_corpus.values():
        if heldout_fraction > 0 and len(comps) >= 2 and all(side[c] == "train" for c in comps):
            side[min(sorted(comps), key=lambda c: _unit_hash(c, seed))] = "heldout"
    return {d.doc_id: side[comp[d.doc_id]] for d in docs}


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _component_ids(docs: list[Document], uf: _UnionFind) -> dict[str, str]:
    members: dict[int, list[str]] = {}
    for i, d in enumerate(docs):
        members.setdefault(uf.find(i), []).append(d.doc_id)
    return {doc_id: min(ids) for ids in members.values() for doc_id in ids}


def _group_components(docs: list[Document]) -> dict[str, str]:
    uf = _UnionFind(len(docs))
    first: dict[str, int] = {}
    for i, d in enumerate(docs):
        if d.group:
            uf.union(first.setdefault(d.group, i), i)
    return _component_ids(docs, uf)


def shingle_hashes(ids: Any, size: int = SHINGLE) -> np.ndarray:
    """A 64-bit hash of every run of `size` consecutive tokens (empty when there are fewer tokens)."""
    a = np.asarray(ids, dtype=np.uint64)
    if len(a) < size:
        return np.zeros(0, dtype=np.uint64)
    weights = np.random.default_rng(20_240_601).integers(1, 2**63, size=size, dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):
        return np.lib.stride_tricks.sliding_window_view(a, size) @ weights


def split_components(docs: list[Document], windows: list[Window], size: int = SHINGLE) -> dict[str, str]:
    """Documents that must share a side: one group, or windows that share a `size`-token shingle (transitively)."""
    uf = _UnionFind(len(docs))
    first: dict[str, int] = {}
    for i, d in enumerate(docs):
        if d.group:
            uf.union(first.setdefault(d.group, i), i)
    hashes = [shingle_hashes(w.ids[w.prefix :], size) for w in windows]
    owners = [np.full(len(h), w.doc_index, dtype=np.int64) for h, w in zip(hashes, windows, strict=True)]
    if hashes:
        h, o = np.concatenate(hashes), np.concatenate(owners)
        order = np.argsort(h, kind="stable")
        h, o = h[order], o[order]
        linked = np.nonzero((h[1:] == h[:-1]) & (o[1:] != o[:-1]))[0]
        for j in linked.tolist():
            uf.union(int(o[j]), int(o[j + 1]))
    return _component_ids(docs, uf)


def analysis_prefix(lm: LM) -> list[int]:
    """The special tokens `analyze` puts before a text (`LM.encode`): a BOS on Llama-3 or Gemma, none on SmolLM2."""
    plain = list(lm.tokenizer("a", add_special_tokens=False)["input_ids"])
    full = lm.encode("a")
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i]
    return []


def plan_dataset(cfg: DataConfig, docs: list[Document], lm: LM) -> Plan:
    """De-duplicate, cut into windows (capped at `max_windows`), then split by component."""
    docs, duplicates = dedupe(docs)
    prefix = analysis_prefix(lm)
    windows = list(_limit(_windows(cfg, docs, lm, prefix), cfg.max_windows))
    components = split_components(docs, windows)
    splits = assign_splits(docs, cfg.seed, cfg.heldout_fraction, components)
    for w in windows:
        w.split = splits[docs[w.doc_index].doc_id]
    return Plan(docs, duplicates, windows, splits, components, prefix)


def _windows(cfg: DataConfig, docs: list[Document], lm: LM, prefix: list[int]) -> Iterator[Window]:
    """Deterministic windows, round-robin over corpora and, within a corpus, over documents, so a run cut at
    `max_windows` still covers every corpus and document (held-out ones included)."""
    per_corpus: dict[str, list[Iterator[Window]]] = {}
    for i, d in enumerate(docs):
        per_corpus.setdefault(d.corpus, []).append(_doc_windows(cfg, i, d, lm, prefix))
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


def _doc_windows(
    cfg: DataConfig, doc_index: int, doc: Document, lm: LM, prefix: list[int]
) -> Iterator[Window]:
    ids = list(lm.tokenizer(doc.text, add_special_tokens=False)["input_ids"])
    if prefix and ids[: len(prefix)] == prefix:
        ids = ids[
            len(prefix) :
        ]  # a rendered chat may open with the BOS itself: every window gets exactly one
    body = cfg.window - len(prefix)
    starts = list(range(0, len(ids) - body + 1, body))[: cfg.max_windows_per_doc]
    for start in starts:
        rng = random.Random(f"{cfg.seed}|{doc.doc_id}|{start}")
        choices = list(range(max(cfg.min_position, len(prefix)), cfg.window))
        positions = sorted(rng.sample(choices, min(cfg.positions_per_window, len(choices))))
        yield Window(doc_index, "", prefix + ids[start : start + body], positions, len(prefix))


def extract_batch(
    lm: LM, layer: int, windows: list[Window], context: int, predictions: bool = True, top_k: int = 3
) -> list[dict[str, Any]]:
    """One forward over equal-length windows: activations after block `layer` (and next-token top-k, or -1s)."""
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
                top = lm.logits(lm.final_norm(out[b, keep])).float().topk(top_k, dim=-1).indices
            else:
                top = torch.full((len(keep), top_k), -1, dtype=torch.long)
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


def subject_fingerprint(lm: LM, layer: int) -> str:
    """A short hash of the subject's weights (embedding, block 0, block `layer`), independent of the dtype it is
    loaded in (bf16-rounded), so a dataset can be tied to the model that made it whatever its source path."""
    h = hashlib.sha256(f"{lm.arch.model_type}|{lm.n_layers}|{lm.d_model}".encode())
    params = [
        lm.embed_tokens.weight,
        *lm.blocks[0].parameters(),
        *lm.blocks[min(layer, lm.n_layers - 1)].parameters(),
    ]
    for t in params:
        flat = t.detach().reshape(-1)[:4096].to(torch.bfloat16).view(torch.int16)
        h.update(flat.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def subject_identity(lm: LM, source: str, layer: int) -> dict[str, Any]:
    return {
        "source": source,
        "model_type": lm.arch.model_type,
        "n_layers": lm.n_layers,
        "d_model": lm.d_model,
        "fingerprint": subject_fingerprint(lm, layer),
    }


def dataset_header(cfg: DataConfig, lm: LM, prefix: list[int]) -> dict[str, Any]:
    """The part of a dataset's `dataset.json` that ties it to its subject and layer: every reader checks these
    keys (a dataset of another subject or layer is refused), so every writer builds them here."""
    return {
        "kind": "talkative_activations",
        "schema_version": SCHEMA_VERSION,
        "model": cfg.source,
        "layer": cfg.layer,
        "d_model": lm.d_model,
        "subject": subject_identity(lm, cfg.source, cfg.layer),
        "prefix": prefix,
        "config": asdict(cfg),
        "corpora": [provenance(s) for s in cfg.corpora],
    }


def build_dataset(cfg: DataConfig, lm: LM, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Extract a train / held-out activation dataset into `out`.

    Windows are processed in chunks of `shard_size` windows; each chunk becomes one shard per split, written
    atomically, and a chunk whose shards exist is skipped, so a killed run resumes where it stopped (a directory
    made from another plan, e.g. other corpora or an older split rule, is refused rather than mixed in).
    """
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    docs: list[Document] = []
    for spec in cfg.corpora:
        docs.extend(documents(spec))
    plan = plan_dataset(cfg, docs, lm)
    windows = plan.windows
    digest = _plan_digest(cfg, plan)
    stamp = out / "chunks" / "plan.sha256"
    if (out / "chunks").is_dir() and (not stamp.is_file() or stamp.read_text().strip() != digest):
        raise DatasetMismatch(
            f"{out} holds chunks of another dataset plan (other settings, corpora or split rule); "
            "extract into a new directory"
        )
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest + "\n")
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
                extract_batch(lm, cfg.layer, batch, cfg.context, cfg.predictions, cfg.top_k), batch
            ):
                groups[split].extend(samples)
            bar.update(len(batch))
        for split, samples in groups.items():
            if samples:
                _write_shard(out / split / f"shard-{c:05d}.safetensors", samples)
        marker.write_text(f"{len(chunk)} windows\n")
    bar.close()
    counts = {
        split: (len(ActivationSet(out / split)) if any((out / split).glob("shard-*")) else 0)
        for split in ("train", "heldout")
    }
    held = [w for w in windows if w.split == "heldout"]
    train = [w for w in windows if w.split == "train"]
    sidecar: dict[str, Any] = {
        **dataset_header(cfg, lm, plan.prefix),
        "positions": f"{cfg.positions_per_window} per {cfg.window}-token window at positions >= {cfg.min_position}, "
        f"norm outliers (> {OUTLIER_FACTOR}x the window median) skipped",
        "windows": len(windows),
        "counts": counts,
        "split_rule": f"identical texts kept once; documents of one group or sharing a {SHINGLE}-token shingle "
        "split together; each component by a hash of its id",
        "shared_shingles": shared_shingles(held, train),
        "documents": [
            {
                "id": d.doc_id,
                "corpus": d.corpus,
                "split": plan.splits[d.doc_id],
                "component": plan.components[d.doc_id],
                "sha256": content_hash(d.text),
                "genre": genre_of(d),
            }
            for d in plan.docs
        ],
        "duplicates": plan.duplicates,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for split in ("train", "heldout"):
        if counts[split]:
            sidecar[f"{split}_variance"] = M.normalized_variance(ActivationSet(out / split).acts)
    (out / "dataset.json").write_text(json.dumps(sidecar, indent=2))
    return sidecar


def shared_shingles(a: list[Window], b: list[Window], size: int = SHINGLE) -> int:
    """How many distinct `size`-token shingles of the windows `a` also occur in the windows `b` (text only)."""
    ha = [shingle_hashes(w.ids[w.prefix :], size) for w in a]
    hb = [shingle_hashes(w.ids[w.prefix :], size) for w in b]
    if not ha or not hb:
        return 0
    return int(np.isin(np.unique(np.concatenate(ha)), np.concatenate(hb)).sum())


def genre_of(doc: Document) -> str:
    """The document's genre key: its own, or its corpus's kind (empty for user files, which have none)."""
    return doc.genre or CORPUS_GENRES.get(doc.corpus, "")


def _plan_digest(cfg: DataConfig, plan: Plan) -> str:
    # top_k at its default is left out so directories extracted before the setting existed keep their digest
    settings = {
        k: v for k, v in asdict(cfg).items() if k != "batch_windows" and not (k == "top_k" and v == 3)
    }
    h = hashlib.sha256(json.dumps(settings).encode())
    for w in plan.windows:
        h.update(f"{plan.docs[w.doc_index].doc_id}|{w.split}|{w.positions}|".encode())
        h.update(np.asarray(w.ids, dtype=np.int64).tobytes())
    return h.hexdigest()


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
    """All shards of one split (of one or several datasets), concatenated in memory (tens of MB for the demo).

    Datasets read together must come from one subject at one layer (refused otherwise). `split` is the split the
    directories hold ("train", "heldout", or "mixed"), so a report can say which data it measured.
    """

    def __init__(self, directory: str | Path | list[str] | list[Path]) -> None:
        dirs = [Path(d) for d in directory] if isinstance(directory, list) else [Path(directory)]
        per_dir = [sorted(d.glob("shard-*.safetensors")) for d in dirs]
        if not any(per_dir):
            raise FileNotFoundError(f"no activation shards in {', '.join(map(str, dirs))}")
        parts = [load_file(str(s)) for shards in per_dir for s in shards]
        width = max(p["ctx"].shape[1] for p in parts)
        top_width = min(p["top"].shape[1] for p in parts)
        self.directories = dirs
        self.acts = torch.cat([p["acts"] for p in parts])
        self.ctx = torch.cat([_left_pad(p["ctx"].long(), width) for p in parts])
        self.pos = torch.cat([p["pos"] for p in parts]).long()
        self.doc = torch.cat([p["doc"] for p in parts]).long()
        # datasets stored with different top-k are read at the smallest
        self.top = torch.cat([p["top"][:, :top_width] for p in parts]).long()
        self.norm = torch.cat([p["norm"] for p in parts])
        # which of `directories` each sample comes from: document indices are only unique within one dataset
        owner = [i for i, shards in enumerate(per_dir) for _ in shards]
        self.source = torch.cat(
            [torch.full((p["pos"].shape[0],), i, dtype=torch.long) for i, p in zip(owner, parts, strict=True)]
        )
        self.meta: dict[str, Any] = {}
        metas: list[dict[str, Any]] = []
        for d in dirs:
            meta = d.parent / "dataset.json"
            metas.append(json.loads(meta.read_text()) if meta.is_file() else {})
        self.meta["datasets"] = [m for m in metas if m]
        self._metas = metas
        _require_consistent(dirs, metas)
        if len(dirs) == 1 and metas[0]:
            self.meta.update(metas[0])
        self.meta["train_variance"] = self.meta.get("train_variance") if len(dirs) == 1 else None
        names = {d.name for d in dirs}
        self.split = names.pop() if len(names) == 1 and names <= {"train", "heldout"} else "mixed"

    def __len__(self) -> int:
        return int(self.acts.shape[0])

    @property
    def current(self) -> Tensor:
        """The token at each sample's position (the last context token)."""
        return self.ctx[:, -1]

    def genres(self) -> list[str]:
        """Each sample's document genre key, from `dataset.json` (a dataset written before genres were recorded
        gives its corpus's kind; "" where neither says)."""
        per_source = [
            [d.get("genre") or CORPUS_GENRES.get(d.get("corpus", ""), "") for d in m.get("documents", [])]
            for m in self._metas
        ]
        return [
            per_source[s][d] if d < len(per_source[s]) else ""
            for s, d in zip(self.source.tolist(), self.doc.tolist(), strict=True)
        ]

    @property
    def doc_key(self) -> Tensor:
        """A document id unique across the datasets read together."""
        return self.source * (1 << 32) + self.doc

    def require_subject(self, lm: LM, source: str, layer: int) -> None:
        """Refuse data extracted from another subject or at another layer than the NLA's (`lm` at `layer`)."""
        for d, meta in zip(self.directories, self._metas, strict=True):
            if not meta:
                continue
            if int(meta.get("layer", layer)) != layer:
                raise DatasetMismatch(
                    f"{d.parent} was extracted at layer {meta['layer']}, the NLA explains layer {layer}"
                )
            ident = meta.get("subject")
            if ident and ident.get("fingerprint"):
                if ident["fingerprint"] != subject_fingerprint(lm, layer):
                    raise DatasetMismatch(
                        f"{d.parent} was extracted from {ident['source']} (weights {ident['fingerprint']}), "
                        f"not from the NLA's subject {source} (weights {subject_fingerprint(lm, layer)})"
                    )
            elif (
                meta.get("model") not in (None, source) or int(meta.get("d_model", lm.d_model)) != lm.d_model
            ):
                raise DatasetMismatch(
                    f"{d.parent} was extracted from {meta.get('model')}, not from the NLA's subject {source}"
                )


def _require_consistent(dirs: list[Path], metas: list[dict[str, Any]]) -> None:
    """Datasets trained or evaluated together must agree on layer and subject."""
    known = [(d, m) for d, m in zip(dirs, metas, strict=True) if m]
    for d, m in known[1:]:
        d0, m0 = known[0]
        if m.get("layer") != m0.get("layer"):
            raise DatasetMismatch(
                f"{d0.parent} is layer {m0.get('layer')} but {d.parent} is layer {m.get('layer')}: "
                "datasets of different layers cannot be mixed"
            )
        f0 = (m0.get("subject") or {}).get("fingerprint")
        f1 = (m.get("subject") or {}).get("fingerprint")
        if (f0 and f1 and f0 != f1) or (not (f0 and f1) and m.get("model") != m0.get("model")):
            raise DatasetMismatch(
                f"{d0.parent} comes from {m0.get('model')} but {d.parent} from {m.get('model')}: "
                "datasets of different subjects cannot be mixed"
            )


def _left_pad(x: Tensor, width: int) -> Tensor:
    if x.shape[1] == width:
        return x
    return torch.cat([torch.full((x.shape[0], width - x.shape[1]), -1, dtype=x.dtype), x], dim=1)


def cross_document_derangement(keys: Tensor, seed: int) -> Tensor:
    """A seeded permutation π with keys[π(i)] != keys[i] for every i (samples of one document never pair up).

    Shuffled-vector and selection controls pair each sample with another one; pairing it with a neighbour
    (a roll by one) mostly pairs it with the same window, which is no control at all. Documents are shuffled,
    laid out one after another, and each sample is paired with the one `m` places further (m = the largest
    document's sample count), which always lands in another document when no document holds more than half
    of the samples. When one does, no such pairing exists: the shift is then n // 2 and the fewest possible
    pairs stay within that document (callers report the fraction, `same_document_fraction`).
    """
    n = len(keys)
    if n < 2:
        raise ValueError("a shuffled control needs at least two samples")
    g = torch.Generator().manual_seed(seed)
    uniq, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    m = min(int(counts.max()), n // 2)
    doc_order = torch.randperm(len(uniq), generator=g)
    rank = torch.empty_like(doc_order)
    rank[doc_order] = torch.arange(len(uniq))
    within = torch.randperm(n, generator=g)
    # sort by (shuffled document rank, random tie-break): each document's samples are contiguous
    order = sorted(range(n), key=lambda i: (int(rank[inverse[i]]), int(within[i])))
    layout = torch.tensor(order)
    perm = torch.empty(n, dtype=torch.long)
    perm[layout] = layout[(torch.arange(n) + m) % n]
    return perm


def same_document_fraction(keys: Tensor, perm: Tensor) -> float:
    """The fraction of pairs (i, π(i)) within one document: 0 for a derangement across documents."""
    return float((keys[perm] == keys).float().mean())
