"""Every engine forward stays within the rows × tokens budget, whatever the explanations' length, and a cancel
callable stops long engine calls early (between decode steps, reconstruction and salience passes)."""

from __future__ import annotations

import pytest
import torch
from nla_reference import tiny_nla, tiny_official_nla

from talkative.nla.analysis import (
    Cancelled,
    max_positions,
    overrides_for,
    prepare,
    run_batch,
    verbalizer_row_tokens,
)
from talkative.nla.kvcache import KVCache
from talkative.nla.options import resolve
from talkative.nla.verbalizer import PromptOverrides

TEXT = "The quick brown fox jumps over the lazy dog."


def _record_forwards(lm) -> list[tuple[int, int]]:
    """Wrap this LM instance's forward to record (rows, tokens held) of every call: its new tokens plus the cached
    keys it attends to."""
    orig = lm.forward
    seen: list[tuple[int, int]] = []

    def forward(h, positions, *, cache=None, **kw):
        held = cache.length if isinstance(cache, KVCache) else 0
        seen.append((h.shape[0], held + h.shape[1]))
        return orig(h, positions, cache=cache, **kw)

    lm.forward = forward
    return seen


def _count_checks(after: int):
    """A cancel callable that answers True from its `after`-th call on, and how often it was asked."""
    calls = [0]

    def cancelled() -> bool:
        calls[0] += 1
        return calls[0] > after

    return cancelled, calls


def test_the_planner_bounds_rows_times_tokens_for_long_explanations(make_tiny):
    nla = tiny_official_nla(make_tiny, max_new_tokens=300)
    opts = resolve({"optimize_explanations_config": {"best_of_k": 4}})
    per_row = verbalizer_row_tokens(nla, overrides_for(nla, opts))
    assert per_row == len(nla.verbalizer.prompt_ids) + 300
    for budget in (512, 4096, 8192, 65536):
        n = max_positions(nla, opts, 256, budget)
        assert n == 1 or n * 4 * per_row <= budget
    # a request's batch_size never lifts the cap either
    big = resolve({"optimize_explanations_config": {"best_of_k": 4}, "batch_size": 200})
    from talkative.nla.analysis import batch_positions

    assert batch_positions(nla, big, 256, 4096) == max_positions(nla, big, 256, 4096)


def test_every_forward_stays_within_the_budget_with_long_explanations(make_tiny):
    nla = tiny_official_nla(make_tiny, max_new_tokens=24)
    budget = 3 * (len(nla.verbalizer.prompt_ids) + 24)  # fewer rows than the k samples of one position
    opts = resolve({"optimize_explanations_config": {"best_of_k": 4}, "no_kl": True, "temperature": 1.0})
    prep = prepare(nla, TEXT, options=opts)
    seen = _record_forwards(nla.verbalizer.lm)
    rows = run_batch(nla, [(prep, prep.positions[:2])], opts, row_token_budget=budget)[0]
    assert len(rows) == 2 and all(r["token_salience"] for r in rows)
    assert max(len(r["token_salience"]) for r in rows) > 12  # long explanations were ablated
    assert seen and max(r * t for r, t in seen) <= budget, max(seen, key=lambda s: s[0] * s[1])
    # the same batch in one piece would have held more than twice as much
    assert 4 * 2 * (len(nla.verbalizer.prompt_ids) + 24) > 2 * budget


def test_budgeted_passes_give_the_same_rows_as_one_pass(make_tiny):
    nla = tiny_official_nla(make_tiny, max_new_tokens=10)
    opts = resolve({"optimize_explanations_config": {"best_of_k": 2}, "no_kl": True, "temperature": 1.0})
    prep = prepare(nla, TEXT, options=opts)
    pos = prep.positions[:3]
    whole = run_batch(nla, [(prep, pos)], opts, row_token_budget=1 << 20)[0]
    split = run_batch(nla, [(prep, pos)], opts, row_token_budget=(len(nla.verbalizer.prompt_ids) + 10))[0]
    for a, b in zip(whole, split, strict=True):
        assert a["explanation"] == b["explanation"]
        assert a["nmse"] == pytest.approx(b["nmse"], abs=1e-4)
        assert a["token_salience"] == pytest.approx(b["token_salience"], abs=1e-3)


def test_soft_prompt_salience_is_chunked_within_the_budget(make_tiny):
    nla = tiny_nla(make_tiny, "llama", t_text=12)
    opts = resolve({"optimize_explanations_config": {"best_of_k": 1}, "no_kl": True})
    prep = prepare(nla, TEXT, options=opts)
    per_row = verbalizer_row_tokens(nla, PromptOverrides())
    budget = 2 * per_row + 8
    seen = _record_forwards(nla.verbalizer.lm)
    rows = run_batch(nla, [(prep, prep.positions[:4])], opts, row_token_budget=budget)[0]
    assert all(len(r["token_salience"]) == 12 for r in rows)
    assert max(r * t for r, t in seen) <= budget


@pytest.mark.parametrize("official", [False, True])
def test_a_cancel_callable_stops_the_decode_after_n_steps(make_tiny, official):
    nla = tiny_official_nla(make_tiny, max_new_tokens=30) if official else tiny_nla(make_tiny, t_text=30)
    v = nla.verbalizer
    A = prepare(nla, TEXT).acts[:3].float()
    seen = _record_forwards(v.lm)
    cancelled, calls = _count_checks(after=5)
    with pytest.raises(Cancelled):
        v.generate(A, 2, None, 0.0, cancelled=cancelled)
    assert calls[0] == 6  # asked before each step, stopped at the sixth
    decode_steps = [s for s in seen if s[1] > 0 and s[0] == 6]
    assert len(decode_steps) <= 6 < 30


def test_a_cancelled_batch_returns_during_salience(make_tiny):
    nla = tiny_official_nla(make_tiny, max_new_tokens=16)
    opts = resolve({"optimize_explanations_config": {"best_of_k": 2}, "no_kl": True})
    prep = prepare(nla, TEXT, options=opts)
    pos = prep.positions[:2]
    budget = 2 * (len(nla.verbalizer.prompt_ids) + 16)
    run_batch(nla, [(prep, pos)], opts, row_token_budget=budget)  # computes the shared prompt prefixes once
    seen = _record_forwards(nla.verbalizer.lm)
    cancelled, calls = _count_checks(after=10_000)
    run_batch(nla, [(prep, pos)], opts, row_token_budget=budget, cancelled=cancelled)
    full, asks = len(seen), calls[0]  # forwards and checks of a whole batch
    assert asks > 20
    seen.clear()
    cancelled, calls = _count_checks(after=asks - 5)  # flips during the last passes (salience)
    with pytest.raises(Cancelled):
        run_batch(nla, [(prep, pos)], opts, row_token_budget=budget, cancelled=cancelled)
    assert len(seen) < full
    torch.testing.assert_close(torch.tensor(float(calls[0])), torch.tensor(float(asks - 4)))


def test_template_ablations_reuse_the_keys_before_each_unit(make_tiny):
    """The cached ablations of a template AR give what reconstructing each ablated explanation from scratch gives,
    for explanations of different lengths."""
    nla = tiny_official_nla(make_tiny)
    rec = nla.reconstructor
    units = [rec.units(t) for t in ("a short one", "a somewhat longer explanation of the vector here", "x")]
    spans = [rec.explanation_span(u) for u in units]
    want = []
    for u, (a, b) in zip(units, spans, strict=True):
        for i in range(a, b):
            v = list(u)
            v[i] = rec.space_id
            want.append(rec.reconstruct([v]))
    with torch.no_grad():
        got = rec.ablations(units, spans)
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-4, atol=1e-4)
    cancelled, calls = _count_checks(after=2)
    with pytest.raises(Cancelled):
        rec.ablations(units, spans, cancelled)
    assert calls[0] == 3
