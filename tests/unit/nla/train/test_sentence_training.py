"""The three stages in the sentence language on a tiny model: warm starts are sentences, GRPO penalises text
outside the language, and `talkative eval` reports the claims next to FVE and the baselines."""

from __future__ import annotations

import json

import pytest
import torch
from train_corpus import tiny_data_config, write_modern_records

from talkative.nla.explanations import parse
from talkative.nla.lm import load_lm
from talkative.nla.loading import open_nla
from talkative.nla.train.config import load_config
from talkative.nla.train.data import ActivationSet, build_dataset
from talkative.nla.train.evaluate import evaluate, write_report
from talkative.nla.train.loop import Run
from talkative.nla.train.stages import parse_rate, train, warm_start


@pytest.fixture(scope="module")
def modern_ds(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("sentence-data")
    write_modern_records(root / "modern.jsonl")
    cfg = tiny_data_config(
        root / "modern.jsonl",
        str(tiny_llama_dir),
        corpora=[f"modern:{root / 'modern.jsonl'}"],
        heldout_fraction=0.3,
        predictions=True,
        top_k=5,
    )
    build_dataset(cfg, load_lm(str(tiny_llama_dir), progress=False), root / "ds", progress=False)
    return root / "ds"


def _cfg(tmp, ds, tiny_dir, stage: str, **kw) -> dict:
    cfg = {
        "stage": stage,
        "data": str(ds),
        "out": str(tmp / stage),
        "dtype": "float32",
        "steps": 2,
        "batch_size": 4,
        "eval_every": 2,
        "eval_samples": 8,
        "log_every": 1,
        "group_size": 2,
        "explanations": "sentence",
        "arch": {"source": str(tiny_dir), "layer": 1, "t_text": 24, "patch_layers": 1, "head": "linear"},
    }
    cfg.update(kw)
    return cfg


def test_warm_starts_are_sentences_of_each_samples_claims(tmp_path, modern_ds, tiny_llama_dir):
    run = Run(load_config(None, **_cfg(tmp_path, modern_ds, tiny_llama_dir, "ar-sft")))
    ws = warm_start(run, run.train)
    tok = run.nla.subject.tokenizer
    genres = run.train.genres()
    for i in range(0, len(run.train), max(1, len(run.train) // 6)):
        claims = parse(tok.decode(ws(torch.tensor([i]))[0].tolist()))
        assert claims is not None and claims.genre == genres[i]
        assert claims.next[0] == tok.decode([int(run.train.top[i, 0])]).strip() or not claims.next


def test_parse_rate_tells_sentences_from_other_text(tiny_llama):
    tok = tiny_llama.tokenizer
    rows = [
        tok('A recipe. Next likely "flour". Reading: two cups of')["input_ids"],
        tok("two cups of flour")["input_ids"],
    ]
    width = max(map(len, rows))
    space = tok(" ", add_special_tokens=False)["input_ids"][0]
    ids = torch.tensor([r + [space] * (width - len(r)) for r in rows])
    assert parse_rate(tok, ids).tolist() == [1.0, 0.0]


def test_the_stages_train_and_eval_reports_claims(tmp_path, modern_ds, tiny_llama_dir):
    ar = train(Run(load_config(None, **_cfg(tmp_path, modern_ds, tiny_llama_dir, "ar-sft"))), progress=False)
    av = train(
        Run(load_config(None, **_cfg(tmp_path, modern_ds, tiny_llama_dir, "av-sft", init=str(ar)))),
        progress=False,
    )
    grpo_cfg = _cfg(
        tmp_path,
        modern_ds,
        tiny_llama_dir,
        "grpo",
        init=str(av),
        parse_penalty=1.0,
        kl_weight=0.05,
        claim_reward=0.5,
    )
    out = train(Run(load_config(None, **grpo_cfg)), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["parse_rate"] <= 1.0 for r in rows if "eval" not in r)
    assert all(0.0 <= r["claim_score"] <= r["parse_rate"] for r in rows if "eval" not in r)
    assert "parse_rate_k1" in next(r for r in rows if "eval" in r)["eval"]
    nla = open_nla(str(out))
    held = ActivationSet(modern_ds / "heldout")
    report = evaluate(nla, held, train=ActivationSet(modern_ds / "train"), n=8, kl_samples=0, ks=(1, 2, 8))
    claims = report["claims"]
    assert set(claims) == {"trained, k = 1", "trained, best of 8", "selection control, k = 1"}
    for rep in claims.values():
        assert 0.0 <= rep["parse_rate"] <= 1.0 and rep["top_next_checked"] == 5
        assert rep["genre"]["true"] <= rep["genre"]["stated"]
    assert "claims" in report["samples"][0] and report["samples"][0]["genre"]
    write_report(report, tmp_path / "eval", "tiny")
    assert "parse rate" in (tmp_path / "eval" / "eval.md").read_text()


def test_a_parse_penalty_needs_the_sentence_language():
    with pytest.raises(ValueError, match="parse_penalty"):
        load_config(None, stage="grpo", parse_penalty=1.0)


def test_a_claim_reward_needs_the_sentence_language():
    with pytest.raises(ValueError, match="claim_reward"):
        load_config(None, stage="grpo", claim_reward=0.5)
    with pytest.raises(ValueError, match="claim_reward"):
        load_config(None, stage="grpo", explanations="sentence", claim_reward=-1.0)
