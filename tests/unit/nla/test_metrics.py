"""Reconstruction metrics and KL against formulas written out by hand in float64."""

from __future__ import annotations

import math

import pytest
import torch
from nla_reference import kl_nats, ref_metrics

from talkative.nla import metrics as M


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 96, generator=g) * 3
    b = a * 0.7 + torch.randn(5, 96, generator=g)
    return a, b


def test_metrics_match_the_definitions(pair):
    a, b = pair
    got = M.METRICS.measure(a, b, variance=0.6)
    for i in range(len(a)):
        ref = ref_metrics(a[i], b[i], 0.6)
        for name, want in ref.items():
            assert float(got[name][i]) == pytest.approx(want, rel=1e-5), name


def test_nmse_is_two_minus_two_cosine_and_scale_free(pair):
    a, b = pair
    torch.testing.assert_close(M.nmse(a, b), 2 * (1 - M.cosine(a, b)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(M.nmse(a * 10, b * 0.1), M.nmse(a, b), rtol=1e-5, atol=1e-6)
    assert float(M.nmse(a, a * 3).max()) < 1e-10
    assert float(M.nmse(a, -a).min()) == pytest.approx(4.0)


def test_edge_values(pair):
    a, _ = pair
    assert float(M.mse(a, a).max()) == 0.0
    assert float(M.relative_rmse(a, a).max()) == 0.0
    assert float(M.relative_rmse(a, torch.zeros_like(a)).min()) == pytest.approx(1.0)
    assert M.fve(M.nmse(a, a), None) is None
    assert float(M.fve(M.nmse(a, a), 0.5).min()) == 1.0
    z = torch.zeros(96)
    assert math.isfinite(float(M.cosine(z, z))) and math.isfinite(float(M.relative_rmse(z, z)))


def test_bf16_inputs_are_scored_in_fp32(pair):
    a, b = pair
    got = M.mse(a.bfloat16(), b.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, M.mse(a.bfloat16().float(), b.bfloat16().float()))


def test_normalized_variance_by_hand():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(50, 32, generator=g) + 2
    n = v.double() / v.double().norm(dim=-1, keepdim=True) * math.sqrt(32)
    want = float(((n - n.mean(0)) ** 2).mean())
    assert M.normalized_variance(v) == pytest.approx(want, rel=1e-5)


def test_kl_from_logits():
    g = torch.Generator().manual_seed(2)
    p = torch.randn(4, 1000, generator=g) * 3
    q = p + torch.randn(4, 1000, generator=g)
    got = M.kl_from_logits(p, q)
    for i in range(4):
        assert float(got[i]) == pytest.approx(kl_nats(p[i], q[i]), rel=1e-4)
    assert float(M.kl_from_logits(p, p + 5.0).abs().max()) < 1e-5  # shift-invariant, zero for equal laws
    big = torch.tensor([[1000.0, 0.0, -1000.0]])
    assert math.isfinite(float(M.kl_from_logits(big, big.flip(-1))))


def test_rescale_to_norm_keeps_the_direction_and_takes_the_norm():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 32, generator=g) * 40, torch.randn(5, 32, generator=g) * 0.01
    r = M.rescale_to_norm(b, a)
    torch.testing.assert_close(r.double().norm(dim=-1), a.double().norm(dim=-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(M.cosine(r, b), torch.ones(5), rtol=1e-6, atol=1e-6)
    # at ‖A‖, the unit-dependent metrics are functions of the direction alone
    n = M.nmse(a, b)
    torch.testing.assert_close(M.relative_rmse(a, r), n.sqrt(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(M.mse(a, r), a.pow(2).sum(-1) / 32 * n, rtol=1e-5, atol=1e-4)
    for factor in (0.1, 10.0):
        torch.testing.assert_close(M.rescale_to_norm(b * factor, a), r, rtol=1e-5, atol=1e-5)
