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


def _tiny_mistral(tokenizer, window: int | None):
    from transformers import AutoModelForCausalLM, MistralConfig

    from talkative.nla.lm import LM

    cfg = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=window,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LM(AutoModelForCausalLM.from_config(cfg), tokenizer, source="tiny-mistral")


def test_a_global_sliding_window_applies_to_every_layer(tokenizer):
    """Mistral-style: `sliding_window` without `layer_types`; transformers windows every layer."""
    lm = _tiny_mistral(tokenizer, window=4)
    assert lm.arch.layer_types == ("sliding_attention",) * 4 and lm.arch.sliding_window == 4
    ids = _ids(lm, n=20)
    with torch.no_grad():
        ref = lm.model(ids, output_hidden_states=True).hidden_states
        for layer in range(lm.n_layers - 1):
            torch.testing.assert_close(lm.residual(ids, layer), ref[layer + 1], rtol=1e-5, atol=1e-5)
        # the window matters here: the same weights without it give other states
        lm.model.config.sliding_window = None
        unwindowed = lm.model(ids, output_hidden_states=True).hidden_states
        lm.model.config.sliding_window = 4
        assert not torch.allclose(unwindowed[2], ref[2], atol=1e-3)
        # decoding one token at a time through the cache sees the same window
        cache = KVCache(2, 3)
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand(2, -1)
        outs = [lm.forward(lm.embed(ids[:, :6]), pos[:, :6], cache=cache)]
        for i in range(6, ids.shape[1]):
            outs.append(lm.forward(lm.embed(ids[:, i : i + 1]), pos[:, i : i + 1], cache=cache))
        logits = lm.logits(lm.final_norm(torch.cat(outs, 1)))
    torch.testing.assert_close(logits, lm.model(ids).logits, rtol=1e-4, atol=1e-4)
