"""An NLA's identity is its content: the same weights give the same hash however often they are loaded, any changed
tensor (trained, base or tuned lens) or setting gives another."""

from __future__ import annotations

import torch
from nla_reference import tiny_nla

from talkative.nla.identity import content_hash
from talkative.nla.lens import TunedLens


def test_same_content_same_hash_and_any_change_another(make_tiny):
    a, b = tiny_nla(make_tiny, "llama"), tiny_nla(make_tiny, "llama")
    base = content_hash(a)
    assert content_hash(b) == base and len(base) == 64
    memo: dict[int, str] = {}
    assert content_hash(a, memo=memo) == base and memo  # base digests are shared through the memo
    with torch.no_grad():
        next(iter(a.verbalizer.parameters())).add_(1e-3)
    assert content_hash(a) != base
    c = tiny_nla(make_tiny, "llama")
    c.fve_variance = 2.5
    assert content_hash(c) != base
    lens = TunedLens(c.d_model, c.subject.n_layers)
    assert content_hash(tiny_nla(make_tiny, "llama"), lens) != base
