"""Inverse-CDF sampling from caller-supplied uniforms, and the per-(seed, key) streams."""

from __future__ import annotations

import pytest
import torch

from talkative.nla.sampling import row_generator, row_uniforms, sample_next


def _logits(rows=4, v=50, seed=0):
    return torch.randn(rows, v, generator=torch.Generator().manual_seed(seed)) * 2


def _inverse_cdf(logits, t, u):
    p = torch.softmax(logits.double() / t, -1)
    cdf = p.cumsum(-1)
    return [int((cdf[r] <= u[r] * cdf[r, -1]).sum()) for r in range(len(u))]


def test_temperature_zero_is_argmax_and_ignores_uniforms():
    lg = _logits()
    assert sample_next(lg, 0.0, None).tolist() == lg.argmax(-1).tolist()
    assert sample_next(lg, 0.0, torch.rand(4)).tolist() == lg.argmax(-1).tolist()


def test_sampling_is_the_inverse_cdf():
    lg = _logits(rows=64)
    u = torch.rand(64, generator=torch.Generator().manual_seed(3))
    for t in (0.5, 1.0, 1.7):
        assert sample_next(lg, t, u).tolist() == _inverse_cdf(lg, t, u)


def test_sampling_needs_uniforms():
    with pytest.raises(ValueError, match="uniforms"):
        sample_next(_logits(), 1.0, None)


def test_empirical_distribution_matches_softmax():
    lg = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    n = 20000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    toks = sample_next(lg.expand(n, -1), 0.8, u)
    freq = torch.bincount(toks, minlength=4).double() / n
    torch.testing.assert_close(freq, torch.softmax(lg[0].double() / 0.8, -1), atol=0.01, rtol=0)


def test_top_p_keeps_the_smallest_nucleus():
    lg = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    n = 5000
    u = torch.rand(n, generator=torch.Generator().manual_seed(1))
    toks = sample_next(lg.expand(n, -1), 1.0, u, top_p=0.7)
    assert set(toks.tolist()) == {0, 1}  # 0.5 < 0.7, 0.5+0.3 >= 0.7: two tokens
    freq = torch.bincount(toks, minlength=4).double() / n
    assert float(freq[0]) == pytest.approx(0.5 / 0.8, abs=0.03)
    assert set(sample_next(lg.expand(n, -1), 1.0, u, top_p=0.01).tolist()) == {0}  # always the top token
    full = sample_next(lg.expand(n, -1), 1.0, u, top_p=1.0)
    assert set(full.tolist()) == {0, 1, 2, 3}


def test_streams_are_reproducible_and_independent():
    a = row_uniforms(7, [(0, 0), (0, 1), (3, 2)], 6)
    b = row_uniforms(7, [(3, 2), (0, 0)], 6)
    assert a.shape == (3, 6)
    torch.testing.assert_close(a[2], b[0])
    torch.testing.assert_close(a[0], b[1])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(row_uniforms(8, [(0, 0)], 6)[0], a[0])
    # a stream's first n draws do not depend on how many are drawn
    torch.testing.assert_close(row_uniforms(7, [(0, 0)], 10)[0, :6], a[0])
    g1, g2 = row_generator(1, 2, 3), row_generator(1, 2, 3)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))
    assert row_uniforms(1, [], 5).shape == (0, 5)
    assert float(a.min()) >= 0 and float(a.max()) < 1
