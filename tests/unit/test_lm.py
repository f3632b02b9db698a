"""The explicit block-range forwards agree with the HF forward for every supported family."""

from __future__ import annotations

import pytest
import torch

from talkative.nla.kvcache import KVCache, PrefixView

FAMILIES = ["llama", "qwen2", "gpt2", "gemma2", "gemma3"]


def _ids(lm, n=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 1000, (2, n), generator=g)


@pytest.mark.parametrize("kind", FAMILIES)
def test_residual_matches_hf_hidden_states(make_tiny, kind):
    lm = make_tiny(kind)
    ids = _ids(lm)
    with torch.no_grad():
        ref = lm.model(ids, output_hidden_states=True).hidden_states
        for layer in range(lm.n_layers - 1):  # the last HF entry is after the final norm
            torch.testing.assert_close(lm.residual(ids, layer), ref[layer + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", FAMILIES)
def test_incremental_cache_matches_full_forward(make_tiny, kind):
    lm = make_tiny(kind)
    ids = _ids(lm, n=18)
    with torch.no_grad():
        ref = lm.model(ids).logits
        cache = KVCache(2, 3)  # starts small: exercises growth
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand(2, -1)
        outs = [lm.forward(lm.add_positions(lm.embed(ids[:, :5]), pos[:, :5]), pos[:, :5], cache=cache)]
        for i in range(5, ids.shape[1]):
            p = pos[:, i : i + 1]
            outs.append(lm.forward(lm.add_positions(lm.embed(ids[:, i : i + 1]), p), p, cache=cache))
        logits = lm.logits(lm.final_norm(torch.cat(outs, 1)))
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", FAMILIES)
def test_prefix_view_patches_one_position_with_full_left_context(make_tiny, kind):
    """Patching block L's output at p and running L+1.. on one token equals a full patched forward at p."""
    lm = make_tiny(kind)
    ids = _ids(lm, n=12)[:1]
    L = 1
    S = ids.shape[1]
    with torch.no_grad():
        pos = torch.arange(S).unsqueeze(0)
        cache = KVCache(1, S)
        lm.forward(lm.add_positions(lm.embed(ids), pos), pos, cache=cache)
        new = torch.randn(3, lm.d_model)
        ps = torch.tensor([0, 5, S - 1])
        view = PrefixView(cache, torch.arange(S).unsqueeze(0) < ps.unsqueeze(1))
        got = lm.forward(new.unsqueeze(1), ps.unsqueeze(1), start=L + 1, cache=view)[:, 0]
        for r, p in enumerate(ps.tolist()):

            def patch(i, h, p=p, r=r):
                if i == L + 1:
                    h = h.clone()
                    h[:, p] = new[r]
                return h

            full = lm.forward(lm.add_positions(lm.embed(ids), pos), pos, patch=patch)
            torch.testing.assert_close(got[r], full[0, p], rtol=1e-4, atol=1e-4)


def test_gemma_embeddings_are_scaled(make_tiny):
    lm = make_tiny("gemma3")
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(lm.embed(ids), lm.embed_tokens(ids))
    assert lm.arch.embed_scale == pytest.approx(64**0.5)


def test_unsupported_model_type_is_refused():
    from transformers import BertConfig

    from talkative.nla.lm import describe_arch

    with pytest.raises(ValueError, match="not supported"):
        describe_arch(BertConfig())
