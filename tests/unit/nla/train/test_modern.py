"""The modern-text corpus: a large varied prompt set, resumable batched generation with a seed per document,
near-duplicates dropped, a split by topic that shares no text, and genres carried into the activation data."""

from __future__ import annotations

import json

import torch
from train_corpus import random_text, tiny_data_config, write_modern_records

from talkative.nla.explanations import GENRE_LABELS, RECENT_TOKENS, clean_piece, render
from talkative.nla.prompts import end_of_turn_ids
from talkative.nla.sampling import step_seeds
from talkative.nla.train.claims import claim_report
from talkative.nla.train.corpora import documents
from talkative.nla.train.data import SHINGLE, ActivationSet, build_dataset, plan_dataset
from talkative.nla.train.modern import (
    GENRES,
    distinct_trigrams,
    generate_batch,
    modern_prompts,
    near_duplicates,
    read_modern,
    write_modern,
)


def test_the_prompt_set_is_large_and_varied():
    prompts = modern_prompts()
    assert len(prompts) >= 2000 and len({p.doc_id for p in prompts}) == len(prompts)
    assert len({p.genre for p in prompts}) >= 10 and all(g.key in GENRE_LABELS for g in GENRES)
    families = {p.family for p in prompts}
    assert all(sum(p.family == f for p in prompts[:120]) in (0, len(GENRES)) for f in families)
    assert len({p.prompt for p in prompts}) == len(prompts)


def test_batched_generation_gives_each_document_its_own_stream(tiny_llama):
    """A document's text does not depend on the batch it is written in (left padding, its own seeds)."""
    lm = tiny_llama
    prompts = [
        lm.encode("Write a story about a cat."),
        lm.encode("Hi"),
        lm.encode("A much longer prompt " * 3),
    ]
    seeds = step_seeds(3, [(0, i) for i in range(3)], 12)
    stops = end_of_turn_ids(lm)
    together, _ = generate_batch(lm, prompts, seeds, stops, temperature=1.0, top_p=0.9)
    for i in range(3):
        alone, _ = generate_batch(lm, prompts[i : i + 1], seeds[i : i + 1], stops, temperature=1.0, top_p=0.9)
        assert alone == [together[i]]
    assert len(set(together)) == 3


def test_generation_resumes_without_rewriting(tmp_path, tiny_llama):
    out = tmp_path / "modern.jsonl"
    prompts = modern_prompts()[:5]
    assert write_modern(tiny_llama, out, prompts, batch=2, max_new_tokens=6, limit=3, progress=False) == 3
    first = out.read_text()
    assert write_modern(tiny_llama, out, prompts, batch=2, max_new_tokens=6, progress=False) == 2
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert out.read_text().startswith(first) and [r["id"] for r in recs] == [p.doc_id for p in prompts]
    assert all(r["genre"] and r["prompt"] and r["family"] for r in recs)
    assert recs[0]["genre"] == "conversation" and recs[0]["text"].startswith("<|im_start|>")


def test_near_duplicates_are_found():
    a = random_text(1, 200, sentences=True)
    near = a.replace("river", "lake", 2)
    texts = [a, random_text(2, 200), near, a[:400]]
    assert near_duplicates(texts) == {2: 0}  # a short prefix shares too small a part of its word set


def test_replies_stuck_in_a_loop_or_too_short_are_dropped(tmp_path):
    good = random_text(5, 120, sentences=True)
    loop = "Spread a little chowder over your plate. " * 20
    recs = [("news/000", good), ("recipe/000", loop), ("code/000", "x = 1  # short")]
    path = tmp_path / "modern.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": i, "genre": i.split("/")[0], "family": "topic:000", "reply": t, "text": t})
            + "\n"
            for i, t in recs
        )
    )
    assert distinct_trigrams(loop) < 0.3 < distinct_trigrams(good)
    assert [r.doc_id for r in read_modern(path)] == ["news/000"]


def test_the_split_is_by_family_and_shares_no_text(tmp_path, tiny_llama):
    path = tmp_path / "modern.jsonl"
    write_modern_records(path)
    docs = list(documents(f"modern:{path}"))
    ids = {d.doc_id for d in docs}
    assert "modern/news/900" not in ids and "modern/recipe/901" not in ids  # copies dropped, whatever family
    assert {d.genre for d in docs} == {"news", "recipe", "code"}
    cfg = tiny_data_config(
        path,
        "tiny",
        corpora=[f"modern:{path}"],
        heldout_fraction=0.3,
        window=64,
        max_windows=400,
        max_windows_per_doc=8,
    )
    plan = plan_dataset(cfg, docs, tiny_llama)
    family = {d.doc_id: d.group for d in docs}
    held = {family[k] for k, s in plan.splits.items() if s == "heldout"}
    train = {family[k] for k, s in plan.splits.items() if s == "train"}
    assert held and train and not held & train
    texts = {d.doc_id: d.text for d in docs}
    assert not {texts[k] for k, s in plan.splits.items() if s == "heldout"} & {
        texts[k] for k, s in plan.splits.items() if s == "train"
    }

    def runs(split: str) -> set[tuple[int, ...]]:
        out: set[tuple[int, ...]] = set()
        for w in plan.windows:
            if w.split == split:
                out.update(tuple(w.ids[i : i + SHINGLE]) for i in range(len(w.ids) - SHINGLE + 1))
        return out

    assert not runs("heldout") & runs("train")


def test_genres_reach_the_activation_data_and_the_claim_checks(tmp_path, tiny_llama_dir):
    from talkative.nla.lm import load_lm

    path = tmp_path / "modern.jsonl"
    write_modern_records(path)
    lm = load_lm(str(tiny_llama_dir), progress=False)
    cfg = tiny_data_config(
        path, str(tiny_llama_dir), corpora=[f"modern:{path}"], heldout_fraction=0.3, predictions=True, top_k=5
    )
    build_dataset(cfg, lm, tmp_path / "ds", progress=False)
    data = ActivationSet(tmp_path / "ds" / "heldout")
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    by_index = [d["genre"] for d in meta["documents"]]
    assert data.genres() == [by_index[d] for d in data.doc.tolist()] and data.top.shape[1] == 5
    tok = lm.tokenizer
    n = min(6, len(data))
    idx = torch.arange(n)
    true_texts, false_texts = [], []
    for i in range(n):
        ctx = [t for t in data.ctx[i].tolist() if t >= 0]
        tops = [tok.decode([t]) for t in data.top[i].tolist()]
        nxt = next(t for t in tops[1:] if clean_piece(t))  # a top-5 token that is not the first: still true
        true_texts.append(render(data.genres()[i], tok.decode(ctx[-2:]), [nxt]))
        # no document here is a dialogue; the quote and the next token are nowhere in the samples
        false_texts.append(render("dialogue", "zzz qqq", ["qqqzz"]))
    assert len(ctx) > RECENT_TOKENS
    space = tok(" ", add_special_tokens=False)["input_ids"][0]

    def ids(texts: list[str]) -> torch.Tensor:
        rows = [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
        width = max(map(len, rows))
        return torch.tensor([r + [space] * (width - len(r)) for r in rows])

    good = claim_report(tok, data, idx, ids(true_texts))
    bad = claim_report(tok, data, idx, ids(false_texts))
    garbage = claim_report(tok, data, idx, ids(["two cups of flour"] * n))
    assert good["parse_rate"] == bad["parse_rate"] == 1.0 and garbage["parse_rate"] == 0.0
    assert good["genre"]["true"] == good["quote"]["true"] == good["next"]["true"] == 1.0
    assert bad["genre"]["true"] == bad["quote"]["true"] == bad["next"]["true"] == 0.0
    assert bad["genre"]["stated"] == 1.0 and garbage["genre"]["stated"] == 0.0
    assert good["top_next_checked"] == 5
    assert next(iter(read_modern(path))).genre == "news"
