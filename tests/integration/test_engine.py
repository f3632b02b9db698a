"""The engine on the bundled SmolLM2-135M-Instruct: rows against plain HF references, seeds across batches."""

from __future__ import annotations

import pytest
import torch
from nla_reference import hf_activations, hf_logits, hf_patched_logits, kl_nats, ref_metrics

from talkative.nla.analysis import analyze, prepare, run_batch
from talkative.nla.checkpoint import NLA
from talkative.nla.flags import POSITION_FLAGS
from talkative.nla.lm import load_lm
from talkative.nla.options import resolve
from talkative.nla.sources import DEFAULT_SOURCE

pytestmark = pytest.mark.integration

TEXT = "The capital of France is Paris."


@pytest.fixture(scope="module")
def nla(smollm2):
    return NLA.init(smollm2, 20, subject_source=DEFAULT_SOURCE, fve_variance=0.9)


def test_rows_match_plain_hf_references(nla):
    res = analyze(
        nla, TEXT, options={"optimize_explanations_config": {"best_of_k": 2}, "return_vectors": True}
    )
    lm = nla.subject
    ids = lm.encode(TEXT)
    assert len(res.rows) == len(ids) == 7
    acts = hf_activations(lm, ids, 20)
    clean = hf_logits(lm, ids)
    for r in res.rows:
        p = r["position"]
        torch.testing.assert_close(torch.tensor(r["activation"]), acts[p], rtol=1e-4, atol=2e-3)
        a_hat = torch.tensor(r["reconstruction"])
        for name, want in ref_metrics(acts[p], a_hat, 0.9).items():
            assert r[name] == pytest.approx(want, rel=1e-3, abs=1e-4), (p, name)
        want = kl_nats(clean[p], hf_patched_logits(lm, ids, 20, p, a_hat))
        assert r["kl_divergence"] == pytest.approx(want, rel=5e-3, abs=1e-3), p
        assert len(r["token_salience"]) == 8 and len(r["explanation_structured"]) == 8
    # the attention sink at position 0 is marked; all 7 positions are early ones, left out of the summary
    assert res.rows[0]["outlier"] and not any(r["outlier"] for r in res.rows[1:])
    assert [f for f in res.rows[0]["flags"] if f in POSITION_FLAGS] == ["early_position", "outlier"]
    summary = res.metadata["summary"]
    assert summary["positions_in_summary"] == 0 and summary["mean_mse"] is None
    assert {f: summary["excluded_by_flag"][f] for f in POSITION_FLAGS} == {
        "early_position": 7,
        "bos": 0,
        "system_prompt": 0,
        "outlier": 1,
    }


def test_same_seed_same_explanations_in_any_batch(nla):
    opts = {"optimize_explanations_config": {"best_of_k": 2}, "seed": 7, "no_kl": True}
    r = resolve(opts)
    mine = prepare(nla, TEXT, options=opts)
    other = prepare(nla, "A completely different sentence about cats.", options={**opts, "seed": 99})
    alone = run_batch(nla, [(mine, [2, 4, 5])], r)[0]
    merged = run_batch(nla, [(other, [0, 1, 3, 6]), (mine, [2, 4, 5])], r)[1]
    assert [x["explanation"] for x in merged] == [x["explanation"] for x in alone]
    full = analyze(nla, TEXT, options={**opts, "batch_size": 1}).rows
    assert [full[q]["explanation"] for q in (2, 4, 5)] == [x["explanation"] for x in alone]


def test_bf16_subject(nla):
    lm = load_lm(DEFAULT_SOURCE, dtype="bfloat16", progress=False)
    bf = NLA.init(lm, 20, subject_source=DEFAULT_SOURCE)
    rows = analyze(
        bf, TEXT, options={"optimize_explanations_config": {"best_of_k": 2}, "return_vectors": True}
    ).rows
    ids = lm.encode(TEXT)
    acts = hf_activations(lm, ids, 20)
    for r in rows:
        torch.testing.assert_close(torch.tensor(r["activation"]), acts[r["position"]], rtol=0, atol=0)
        assert r["kl_divergence"] >= 0 and 0 < r["cosine"] <= 1
    # close to the fp32 activations
    ref = hf_activations(nla.subject, ids, 20)
    cos = torch.nn.functional.cosine_similarity(torch.tensor([r["activation"] for r in rows]), ref, dim=-1)
    assert float(cos.min()) > 0.98
