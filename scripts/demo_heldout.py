"""Extract a clean held-out set for the committed demo NLA, from documents that share no text with its training data.

The demo checkpoint was trained before the split de-duplicated documents: its training split was a hash of each
document id, with the `milton` corpus holding every work twice under two names, so some held-out works had their
twin in train. This script rebuilds that training split exactly (same corpora, same windows, the old rule), takes
the held-out windows of today's split (`talkative train data`'s rule), and keeps only documents that were not
trained on, whose text is not a trained document's text, and none of whose windows shares a 64-token shingle with
a training window. It extracts the first `--windows` of those (round-robin over corpora) and, for the token-mean
baseline, the first `--train-windows` windows the demo did train on, into DIR/heldout and DIR/train with a
dataset.json that records the check. `talkative eval` then reads DIR/heldout (and DIR/train beside it).

    python scripts/demo_heldout.py --out data/demo-heldout --windows 96 --train-windows 400
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from talkative.nla.lm import load_lm  # noqa: E402
from talkative.nla.train.corpora import Document, documents  # noqa: E402
from talkative.nla.train.data import (  # noqa: E402
    SHINGLE,
    DataConfig,
    Window,
    _limit,
    _windows,
    _write_shard,
    analysis_prefix,
    content_hash,
    dataset_header,
    extract_batch,
    plan_dataset,
    shingle_hashes,
)


def legacy_splits(docs: list[Document], seed: int, fraction: float) -> dict[str, str]:
    """The split the demo was trained with: a hash of each document id; one held-out document per corpus at least."""

    def unit(doc_id: str) -> float:
        return int.from_bytes(hashlib.sha256(f"{seed}|{doc_id}".encode()).digest()[:8], "little") / 2**64

    splits = {d.doc_id: ("heldout" if unit(d.doc_id) < fraction else "train") for d in docs}
    by_corpus: dict[str, list[Document]] = {}
    for d in docs:
        by_corpus.setdefault(d.corpus, []).append(d)
    for items in by_corpus.values():
        if fraction > 0 and len(items) >= 2 and all(splits[d.doc_id] == "train" for d in items):
            splits[min(items, key=lambda d: unit(d.doc_id)).doc_id] = "heldout"
    return splits


def _members(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Which `values` occur in `sorted_set` (sorted, unique): a binary search, not a sort per call."""
    at = np.searchsorted(sorted_set, values).clip(max=max(len(sorted_set) - 1, 0))
    return sorted_set[at] == values if len(sorted_set) else np.zeros(len(values), dtype=bool)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "data-smollm2-l12.yaml")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--windows", type=int, default=96, help="held-out windows to extract (4 positions each)")
    ap.add_argument(
        "--train-windows", type=int, default=400, help="trained-on windows for the token-mean baseline"
    )
    args = ap.parse_args()
    cfg = DataConfig(**yaml.safe_load(args.config.read_text()))
    lm = load_lm(cfg.source, dtype=cfg.dtype, progress=False)
    if analysis_prefix(lm):
        raise SystemExit("the demo's windows had no BOS; this check assumes a subject without one")
    t0 = time.time()
    docs = [d for spec in cfg.corpora for d in documents(spec)]

    # what the demo trained on: every document (duplicates included), windows capped as they were, the old split
    old_split = legacy_splits(docs, cfg.seed, cfg.heldout_fraction)
    old_windows = list(_limit(_windows(cfg, docs, lm, []), cfg.max_windows))
    trained = [w for w in old_windows if old_split[docs[w.doc_index].doc_id] == "train"]
    trained_ids = {docs[w.doc_index].doc_id for w in trained}
    trained_texts = {content_hash(docs[w.doc_index].text) for w in trained}
    trained_shingles = np.unique(np.concatenate([shingle_hashes(w.ids) for w in trained]))

    # today's split, minus anything the demo saw
    plan = plan_dataset(cfg, docs, lm)
    held = [w for w in plan.windows if w.split == "heldout"]
    excluded: dict[str, str] = {}
    for w in held:
        d = plan.docs[w.doc_index]
        if d.doc_id in excluded:
            continue
        if d.doc_id in trained_ids:
            excluded[d.doc_id] = "trained on under the old split"
        elif content_hash(d.text) in trained_texts:
            excluded[d.doc_id] = "its text is a trained document's (a duplicate)"
        elif _members(shingle_hashes(w.ids), trained_shingles).any():
            excluded[d.doc_id] = f"shares a {SHINGLE}-token shingle with a training window"
    clean = [w for w in held if plan.docs[w.doc_index].doc_id not in excluded]
    chosen = clean[: args.windows]
    overlap = int(_members(np.concatenate([shingle_hashes(w.ids) for w in chosen]), trained_shingles).sum())
    assert overlap == 0
    print(
        f"{len(held)} held-out windows today, {len(clean)} clean; {len(excluded)} documents excluded; "
        f"planning took {time.time() - t0:.0f} s",
        flush=True,
    )
    for doc_id, why in sorted(excluded.items()):
        print(f"  excluded {doc_id}: {why}")

    def extract(windows: list[Window], split: str) -> int:
        samples = []
        for b in range(0, len(windows), cfg.batch_windows):
            batch = windows[b : b + cfg.batch_windows]
            samples += extract_batch(lm, cfg.layer, batch, cfg.context, predictions=False)
            print(
                f"  {split}: {b + len(batch)}/{len(windows)} windows ({time.time() - t0:.0f} s)", flush=True
            )
        _write_shard(args.out / split / "shard-00000.safetensors", samples)
        return len(samples)

    # held-out samples' `doc` indexes today's de-duplicated documents, the trained ones the old list
    counts = {"heldout": extract(chosen, "heldout"), "train": extract(trained[: args.train_windows], "train")}
    meta = {
        **dataset_header(cfg, lm, []),
        "counts": counts,
        "windows": {"heldout": len(chosen), "train": min(args.train_windows, len(trained))},
        "purpose": "a clean held-out set for the committed demo checkpoint (scripts/demo_heldout.py)",
        "heldout_documents": sorted({plan.docs[w.doc_index].doc_id for w in chosen}),
        "excluded_heldout_documents": excluded,
        "shared_shingles_with_training_windows": overlap,
        "train_note": "train/ holds the first windows the demo was trained on (its old split), for the token-mean "
        "baseline only",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (args.out / "dataset.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps({k: meta[k] for k in ("counts", "windows", "shared_shingles_with_training_windows")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
