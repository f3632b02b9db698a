"""`analyze` rows checked against references computed here with plain HF forwards (see tests/nla_reference.py).

Tiny random models (sharpened so sampling is not a sea of near-ties) keep these fast; every family the engine
supports gets the metric and KL checks.
"""

from __future__ import annotations

import math

import pytest
import torch
from nla_reference import (
    hf_activations,
    hf_logits,
    hf_patched_logits,
    hf_soft_reconstruct,
    kl_nats,
    ref_metrics,
    tiny_nla,
)

from talkative.nla.analysis import Cancelled, analyze, prepare, run_batch
from talkative.nla.options import resolve
from talkative.nla.sampling import step_seeds
from talkative.nla.verbalizer import PromptOverrides

TEXT = "The quick brown fox jumps over the lazy dog."
OTHER = "Paris is the capital of France, and it is lovely in spring."
FAMILIES = ["llama", "qwen2", "gpt2", "gemma2", "gemma3"]


@pytest.fixture(scope="module")
def nla(make_tiny):
    return tiny_nla(make_tiny, "qwen2")


def _opts(k: int = 3, **kw):
    return {"optimize_explanations_config": {"best_of_k": k}, **kw}


def _close(a, b, tol=1e-4):
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


# -- every metric against a reference -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", FAMILIES)
def test_every_metric_matches_a_reference(make_tiny, kind):
    nla = tiny_nla(make_tiny, kind, layer=1)
    res = analyze(nla, TEXT, options=_opts(k=2, return_vectors=True, seed=3))
    ids = nla.subject.encode(TEXT)
    assert [r["position"] for r in res.rows] == list(range(len(ids)))
    acts = hf_activations(nla.subject, ids, nla.layer)
    clean = hf_logits(nla.subject, ids)
    for r in res.rows:
        p = r["position"]
        assert r["token_id"] == ids[p]
        assert r["token"] == nla.subject.tokenizer.decode([ids[p]])
        a = torch.tensor(r["activation"])
        torch.testing.assert_close(a, acts[p], rtol=1e-4, atol=1e-4)
        a_hat = torch.tensor(r["reconstruction"])
        ref = ref_metrics(acts[p], a_hat, nla.fve_variance)
        for name, want in ref.items():
            assert _close(r[name], want), (kind, p, name, r[name], want)
        assert r["nmse"] == pytest.approx(2 * (1 - r["cosine"]), abs=1e-4)
        assert r["norm"] == pytest.approx(float(acts[p].norm()), rel=1e-4)
        want_kl = kl_nats(clean[p], hf_patched_logits(nla.subject, ids, nla.layer, p, a_hat))
        assert _close(r["kl_divergence"], want_kl, 2e-3), (kind, p, r["kl_divergence"], want_kl)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_last_layer_is_read_before_the_final_norm(make_tiny, kind):
    nla = tiny_nla(make_tiny, kind, layer=3)
    ids = nla.subject.encode("Hi there, you.")
    rows = analyze(nla, "Hi there, you.", options=_opts(k=1, return_vectors=True)).rows
    acts = hf_activations(nla.subject, ids, 3)
    clean = hf_logits(nla.subject, ids)
    for r in rows:
        p = r["position"]
        torch.testing.assert_close(torch.tensor(r["activation"]), acts[p], rtol=1e-4, atol=1e-4)
        want = kl_nats(clean[p], hf_patched_logits(nla.subject, ids, 3, p, torch.tensor(r["reconstruction"])))
        assert _close(r["kl_divergence"], want, 2e-3)


def test_kl_is_zero_when_the_reconstruction_is_exact(nla):
    """Patching the clean activation back changes nothing: KL 0 (guards against a context-free KL)."""
    ids = nla.subject.encode(TEXT)
    prep = prepare(nla, TEXT, options=_opts(k=1))
    from talkative.nla.analysis import _kl

    kl = _kl(nla, [(prep, list(range(len(ids))))], prep.acts.float())
    assert max(kl) < 1e-4


def test_fve_is_null_without_a_baseline(make_tiny):
    nla = tiny_nla(make_tiny, fve_variance=None)
    rows = analyze(nla, "Hello there.", options=_opts(k=1, no_kl=True)).rows
    assert all(r["fve"] is None and r["nmse"] is not None for r in rows)


# -- best-of-k, salience -----------------------------------------------------------------------------------------
def _samples(nla, text, k, seed, temperature=1.0):
    """What the engine samples for every position: same step seeds (seed, position, sample), same AV call."""
    prep = prepare(nla, text, options=_opts(k=k, seed=seed, no_kl=True))
    pos = prep.positions
    steps = nla.verbalizer.t_text
    u = step_seeds(seed, [(q, j) for q in pos for j in range(k)], steps)
    expl = nla.verbalizer.generate(prep.acts[pos].float(), k, u, temperature, PromptOverrides())
    return prep, expl


def test_best_of_k_keeps_the_lowest_mse_sample(nla):
    k, seed = 6, 11
    rows = analyze(nla, TEXT, options=_opts(k=k, seed=seed, return_vectors=True, no_kl=True)).rows
    prep, expl = _samples(nla, TEXT, k, seed)
    acts = hf_activations(nla.subject, prep.ids, nla.layer)
    distinct = 0
    for g, r in enumerate(rows):
        p = r["position"]
        cands = expl[g * k : (g + 1) * k]
        hats = [hf_soft_reconstruct(nla.reconstructor, e.ids, prep.ids[p]) for e in cands]
        mses = [float((acts[p] - h).pow(2).mean()) for h in hats]
        best = min(range(k), key=mses.__getitem__)
        distinct += len({tuple(e.ids) for e in cands}) > 1
        assert r["explanation"] == cands[best].text
        assert r["mse"] == pytest.approx(mses[best], rel=1e-4)
        assert r["mse"] <= min(mses) * (1 + 1e-5)
        torch.testing.assert_close(torch.tensor(r["reconstruction"]), hats[best], rtol=1e-4, atol=1e-4)
    assert distinct >= 2  # the k samples really differ somewhere, so the argmin means something


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_salience_equals_one_ablation_at_a_time(make_tiny, kind):
    nla = tiny_nla(make_tiny, kind)
    k, seed = 4, 5
    rows = analyze(nla, TEXT, options=_opts(k=k, seed=seed, return_vectors=True, no_kl=True)).rows
    prep, expl = _samples(nla, TEXT, k, seed)
    rec = nla.reconstructor
    space = nla.subject.tokenizer(" ", add_special_tokens=False)["input_ids"]
    assert rec.space_id == space[0] and len(space) == 1
    acts = hf_activations(nla.subject, prep.ids, nla.layer)
    signs = set()
    for g, r in enumerate(rows):
        p = r["position"]
        best = next(e for e in expl[g * k : (g + 1) * k] if e.text == r["explanation"])
        base = float((acts[p] - hf_soft_reconstruct(rec, best.ids, prep.ids[p])).pow(2).mean())
        assert len(r["token_salience"]) == len(best.ids) == nla.t_text
        for i, got in enumerate(r["token_salience"]):
            ablated = list(best.ids)
            ablated[i] = space[0]
            # one reconstructor call per ablation, and the HF reference for the same ablation
            one = rec.reconstruct([ablated], torch.tensor([prep.ids[p]]))[0]
            ref = hf_soft_reconstruct(rec, ablated, prep.ids[p])
            torch.testing.assert_close(one, ref, rtol=1e-4, atol=1e-5)
            want = (float((acts[p] - ref).pow(2).mean()) - base) / base
            assert got == pytest.approx(want, rel=2e-3, abs=2e-5), (p, i)
            if abs(want) > 1e-4:
                assert math.copysign(1, got) == math.copysign(1, want)
                signs.add(want > 0)
    if kind == "gemma3":
        assert signs == {True, False}  # both signs occur, so the sign check covers something


# -- seeds and batching ----------------------------------------------------------------------------------------------
def _key(rows):
    return [
        (
            r["position"],
            r["explanation"],
            round(r["mse"], 5),
            r["token_salience"] and [round(s, 4) for s in r["token_salience"]],
        )
        for r in rows
    ]


def test_same_seed_reproduces_and_another_seed_differs(nla):
    a = analyze(nla, TEXT, options=_opts(k=3, seed=1)).rows
    b = analyze(nla, TEXT, options=_opts(k=3, seed=1)).rows
    c = analyze(nla, TEXT, options=_opts(k=3, seed=2)).rows
    assert _key(a) == _key(b)
    assert [r["explanation"] for r in a] != [r["explanation"] for r in c]


def test_batch_size_does_not_change_the_rows(nla):
    base = _key(analyze(nla, TEXT, options=_opts(k=3, seed=9, no_kl=True)).rows)
    for bs in (1, 2, 5):
        assert _key(analyze(nla, TEXT, options=_opts(k=3, seed=9, no_kl=True, batch_size=bs)).rows) == base


def test_same_seed_same_explanations_whatever_else_is_in_the_batch(nla):
    opts = resolve(_opts(k=3, seed=4))
    mine = prepare(nla, TEXT, options=_opts(k=3, seed=4))
    other = prepare(nla, OTHER, options=_opts(k=3, seed=123))
    pos = [1, 3, 6]
    alone = run_batch(nla, [(mine, pos)], opts)[0]
    first = run_batch(nla, [(mine, pos), (other, [0, 2, 5, 7])], opts)
    second = run_batch(nla, [(other, [4, 1]), (mine, pos)], opts)
    singles = [run_batch(nla, [(mine, [q])], opts)[0][0] for q in pos]
    for rows in (first[0], second[1], singles):
        assert _key(rows) == _key(alone)
        for r, s in zip(rows, alone, strict=True):
            assert r["kl_divergence"] == pytest.approx(s["kl_divergence"], rel=1e-4, abs=1e-5)
    # and the other input got its own seed's explanations, not ours
    other_alone = run_batch(nla, [(other, [0, 2, 5, 7])], opts)[0]
    assert _key(first[1]) == _key(other_alone)


def test_progress_after_every_batch_and_cancellation(nla):
    calls = []
    analyze(
        nla, TEXT, options=_opts(k=1, batch_size=4, no_kl=True), progress=lambda d, t: calls.append((d, t))
    )
    n = len(nla.subject.encode(TEXT))
    assert calls == [(min(b + 4, n), n) for b in range(0, n, 4)]
    with pytest.raises(Cancelled):
        analyze(nla, TEXT, options=_opts(k=1, batch_size=4), cancelled=lambda: len(calls) > 0)
    seen = []
    with pytest.raises(Cancelled):
        analyze(
            nla,
            TEXT,
            options=_opts(k=1, batch_size=4, no_kl=True),
            progress=lambda d, t: seen.append(d),
            cancelled=lambda: len(seen) >= 1,
        )
    assert seen == [4]  # stopped between batches, after the first


def test_metadata_and_summary(nla):
    res = analyze(nla, TEXT, options=_opts(k=2, seed=3))
    md = res.metadata
    assert md["layer"] == nla.layer and md["best_of_k"] == 2 and md["seed"] == 3
    assert md["n_positions"] == len(res.rows) == md["n_tokens"]
    kept = [r for r in res.rows if not r["flags"]]  # this short text is all early positions
    assert md["summary"]["positions_in_summary"] == len(kept)
    want = pytest.approx(sum(r["mse"] for r in kept) / len(kept)) if kept else None
    assert md["summary"]["mean_mse"] == want
    assert set(md["stage_seconds"]) >= {"extract", "verbalize", "reconstruct", "salience", "kl"}
