"""Verbalizers against hand-written decodes through the HF model (`inputs_embeds`, hooks on the HF blocks, no cache)."""

from __future__ import annotations

import re

import pytest
import torch
from nla_reference import (
    hf_greedy_embedding_replacement,
    hf_greedy_layer_replacement,
    hf_input_embeddings,
    layer_replacement_prompt,
    projection,
    replace_block_input,
    tiny_nla,
    tiny_official_nla,
)

from talkative.nla.prompts import encode_piece
from talkative.nla.sampling import sample_next, step_seeds
from talkative.nla.verbalizer import (
    EmbeddingReplacementVerbalizer,
    LayerReplacementVerbalizer,
    PromptOverrides,
    read_explanation,
)


def _acts(lm, n=3, seed=0):
    ids = torch.randint(100, 5000, (1, 12), generator=torch.Generator().manual_seed(seed))
    return lm.residual(ids, 1)[0, -n:].float()


@pytest.mark.parametrize(
    ("kind", "patch_layers"),
    [("llama", 2), ("llama", 0), ("llama", 4), ("gpt2", 3), ("gemma3", 2), ("qwen2", 1)],
)
def test_greedy_equals_a_hand_written_hf_decode(make_tiny, kind, patch_layers):
    nla = tiny_nla(make_tiny, kind, patch_layers=patch_layers, t_text=5)
    v = nla.verbalizer
    A = _acts(v.lm)
    out = v.generate(A, 2, None, 0.0)
    assert len(out) == 2 * len(A)
    for g in range(len(A)):
        want = hf_greedy_layer_replacement(v, A[g], 5)
        assert out[2 * g].ids == want == out[2 * g + 1].ids
        assert out[2 * g].text == v.lm.tokenizer.decode(want)
        assert out[2 * g].finish_reason == "length"


def test_layer_replacement_is_not_a_no_op(make_tiny):
    """The per-block replacement matters: a decode that only puts P_0(A) in the input differs (so the test above
    has teeth), and different activations give different explanations."""
    nla = tiny_nla(make_tiny, "qwen2", patch_layers=4, t_text=4)
    v = nla.verbalizer
    with torch.no_grad():  # later layers' projections far from the input one
        v.proj_bias[1:] += torch.randn(3, v.lm.d_model, generator=torch.Generator().manual_seed(0)) * 3
    A = _acts(v.lm, n=4) * 20
    got = [e.ids for e in v.generate(A, 1, None, 0.0)]
    input_only = []
    for g in range(4):
        x, _ = layer_replacement_prompt(v, A[g])
        ids = []
        with torch.no_grad():
            for _ in range(4):
                ids.append(int(v.lm.model(inputs_embeds=x[None]).logits[0, -1].argmax()))
                x = torch.cat([x, hf_input_embeddings(v.lm, torch.tensor(ids[-1:]))])
        input_only.append(ids)
    assert got == [hf_greedy_layer_replacement(v, A[g], 4) for g in range(4)]
    assert got != input_only
    assert len({tuple(g) for g in got}) > 1


def test_sampling_follows_the_sampler_on_the_hf_logits(make_tiny):
    """At temperature τ, token t of row r is the sampler's choice from softmax(logits/τ) with step seed u[r, t],
    with the logits of a teacher-forced HF forward over the row's own prefix."""
    nla = tiny_nla(make_tiny, "qwen2", patch_layers=2, t_text=4)
    v = nla.verbalizer
    A = _acts(v.lm, n=2)
    k, tau = 3, 1.3
    u = step_seeds(7, [(g, j) for g in range(2) for j in range(k)], 4)
    out = v.generate(A, k, u, tau)
    for r, e in enumerate(out):
        a = A[r // k]
        x, n_left = layer_replacement_prompt(v, a)
        x = torch.cat([x, hf_input_embeddings(v.lm, torch.tensor(e.ids[:-1]))])
        with torch.no_grad(), replace_block_input(v.lm, {i: (n_left, projection(v, a, i)) for i in range(2)}):
            logits = v.lm.model(inputs_embeds=x[None]).logits[0, -4:].double()
        want = [int(sample_next(logits[t : t + 1].float(), tau, u[r, t : t + 1])[0]) for t in range(4)]
        assert e.ids == want
    assert len({tuple(e.ids) for e in out}) > 1


def test_add_tokens_force_the_start(make_tiny):
    nla = tiny_nla(make_tiny, "qwen2", t_text=5)
    v = nla.verbalizer
    A = _acts(v.lm, n=2)
    add = encode_piece(v.lm, " hello world")
    assert len(add) == 2
    out = v.generate(A, 1, None, 0.0, PromptOverrides(add_ids=add))
    for g, e in enumerate(out):
        assert e.ids[:2] == add and len(e.ids) == 5
        assert e.ids[2:] == hf_greedy_layer_replacement(v, A[g], 3, add_ids=add)
    sampled = v.generate(A, 2, step_seeds(0, [(0,), (1,), (2,), (3,)], 3), 1.0, PromptOverrides(add_ids=add))
    assert all(e.ids[:2] == add for e in sampled)
    full = v.generate(A, 1, None, 0.0, PromptOverrides(add_ids=encode_piece(v.lm, " a b c d e")))
    assert all(len(e.ids) == 5 for e in full)  # a prefix of exactly T tokens leaves nothing to sample
    with pytest.raises(ValueError, match="add_tokens"):
        v.generate(A, 1, None, 0.0, PromptOverrides(add_ids=encode_piece(v.lm, " a b c d e f")))


def test_replace_left_right_and_hard_tokens_use_plain_token_embeddings(make_tiny):
    nla = tiny_nla(make_tiny, "qwen2", t_text=5)
    v = nla.verbalizer
    lm = v.lm
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a soft prompt well away from its tokens' embeddings, as after training
        for p in (v.prompt_left_emb, v.prompt_right_emb):
            p.add_(torch.randn(p.shape, generator=g) * p.std())
    A = _acts(lm, n=3) * 10
    rows = lm.model.get_input_embeddings().weight.detach()
    left_ids, right_ids = encode_piece(lm, "Tell me about"), encode_piece(lm, " in plain words:")
    cases = {
        "left": (PromptOverrides(replace_left_ids=left_ids), dict(left=rows[left_ids])),
        "right": (PromptOverrides(replace_right_ids=right_ids), dict(right=rows[right_ids])),
        "both": (
            PromptOverrides(replace_left_ids=left_ids, replace_right_ids=right_ids),
            dict(left=rows[left_ids], right=rows[right_ids]),
        ),
        "hard": (PromptOverrides(hard_tokens=True), dict(left=rows[v.left_ids], right=rows[v.right_ids])),
    }
    default = [e.ids for e in v.generate(A, 1, None, 0.0)]
    for name, (ov, ref) in cases.items():
        got = [e.ids for e in v.generate(A, 1, None, 0.0, ov)]
        want = [hf_greedy_layer_replacement(v, A[g], 5, **ref) for g in range(3)]
        assert got == want, name
        assert got != default, (
            name
        )  # the trained soft prompt differs from the plain tokens, so must the output
    # and the default is back afterwards (the cached prompt prefix follows the overrides)
    assert [e.ids for e in v.generate(A, 1, None, 0.0)] == default


def test_prefix_cache_follows_in_place_weight_updates(make_tiny):
    nla = tiny_nla(make_tiny, "qwen2", t_text=4)
    v = nla.verbalizer
    A = _acts(v.lm, n=3) * 10
    before = [e.ids for e in v.generate(A, 1, None, 0.0)]
    with torch.no_grad():
        v.prompt_left_emb.add_(torch.randn_like(v.prompt_left_emb) * 0.5)
    after = [e.ids for e in v.generate(A, 1, None, 0.0)]
    assert after == [hf_greedy_layer_replacement(v, A[g], 4) for g in range(3)]
    assert after != before


def test_token_logprobs_match_the_hf_forward(make_tiny):
    nla = tiny_nla(make_tiny, "qwen2", t_text=4)
    v = nla.verbalizer
    A = _acts(v.lm, n=2)
    ids = torch.tensor([[10, 200, 3000, 40], [5, 6, 7, 8]])
    logp, ent = v.token_logprobs(A, ids)
    for g in range(2):
        x, n_left = layer_replacement_prompt(v, A[g])
        x = torch.cat([x, hf_input_embeddings(v.lm, ids[g, :-1])])
        with (
            torch.no_grad(),
            replace_block_input(v.lm, {i: (n_left, projection(v, A[g], i)) for i in range(2)}),
        ):
            lp = torch.log_softmax(v.lm.model(inputs_embeds=x[None]).logits[0, -4:].float(), -1)
        torch.testing.assert_close(
            logp[g].detach(), lp.gather(-1, ids[g, :, None])[:, 0], rtol=1e-4, atol=1e-4
        )
        torch.testing.assert_close(ent[g].detach(), -(lp.exp() * lp).sum(-1), rtol=1e-4, atol=1e-4)


def test_bad_layer_replacement_configs_are_refused(make_tiny):
    lm = make_tiny("llama")
    with pytest.raises(ValueError, match="exactly once"):
        LayerReplacementVerbalizer(lm, prompt="no placeholder")
    with pytest.raises(ValueError, match="patch_layers"):
        LayerReplacementVerbalizer(lm, patch_layers=9)
    with pytest.raises(ValueError, match="t_text"):
        LayerReplacementVerbalizer(lm, patch_layers=1, t_text=0)


# -- embedding replacement (official design) --------------------------------------------------------------------------
def test_embedding_replacement_greedy_equals_a_hand_written_hf_decode(make_tiny):
    nla = tiny_official_nla(make_tiny, max_new_tokens=7)
    v = nla.verbalizer
    assert v.prompt_ids[v.inject_pos] == v.marker_id
    A = _acts(v.lm, n=3) * 5
    out = v.generate(A, 2, None, 0.0)
    for g in range(3):
        want = hf_greedy_embedding_replacement(v, A[g], 7)
        assert out[2 * g].ids == want == out[2 * g + 1].ids
    add = encode_piece(v.lm, "<explanation>")
    forced = v.generate(A, 1, None, 0.0, PromptOverrides(add_ids=add))
    for g in range(3):
        assert forced[g].ids[: len(add)] == add
        assert forced[g].ids[len(add) :] == hf_greedy_embedding_replacement(v, A[g], 7, add_ids=add)


def test_embedding_replacement_injects_only_the_direction(make_tiny):
    nla = tiny_official_nla(make_tiny, max_new_tokens=5)
    v = nla.verbalizer
    A = _acts(v.lm, n=3)
    assert [e.ids for e in v.generate(A, 1, None, 0.0)] == [e.ids for e in v.generate(A * 37.0, 1, None, 0.0)]
    torch.testing.assert_close(v.inject(A).norm(dim=-1), torch.full((3,), 12.0))


def test_embedding_replacement_refuses_prompt_overrides(make_tiny):
    nla = tiny_official_nla(make_tiny, max_new_tokens=6)
    v = nla.verbalizer
    A = _acts(v.lm, n=2)
    for ov in (
        PromptOverrides(replace_left_ids=[5]),
        PromptOverrides(replace_right_ids=[5]),
        PromptOverrides(hard_tokens=True),
    ):
        with pytest.raises(ValueError, match="layer-replacement"):
            v.generate(A, 1, None, 0.0, ov)


def _favour(lm, token_id, after_calls=0):
    """Make `token_id` the argmax of every logits call from call `after_calls` on (an instance-level wrapper)."""
    orig = lm.logits
    calls = []

    def logits(h, *, softcap=True):
        out = orig(h, softcap=softcap)
        calls.append(1)
        if len(calls) > after_calls:
            out = out.clone()
            out[..., token_id] += 1e4
        return out

    lm.logits = logits


def test_embedding_replacement_stops_at_end_of_turn_and_at_the_stop_string(make_tiny):
    nla = tiny_official_nla(make_tiny, max_new_tokens=6)
    v = nla.verbalizer
    A = _acts(v.lm, n=2)
    eos = v.lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert eos in v.eos_ids
    free = v.generate(A, 2, None, 0.0)
    assert all(len(e.ids) == 6 and e.finish_reason == "length" for e in free)
    _favour(v.lm, eos, after_calls=2)  # prefix pass + one step: the third token is the end of turn
    out = v.generate(A, 2, step_seeds(1, [(i,) for i in range(4)], 6), 1.0)
    assert all(e.finish_reason == "eos" and len(e.ids) == 3 and e.ids[-1] == eos for e in out)

    nla = tiny_official_nla(make_tiny, max_new_tokens=6)
    v = nla.verbalizer
    v.stop = " zebra"
    (zebra,) = encode_piece(v.lm, " zebra")
    _favour(v.lm, zebra, after_calls=1)
    out = v.generate(A, 1, None, 0.0, PromptOverrides(add_ids=encode_piece(v.lm, "<explanation> a")))
    assert all(e.finish_reason == "stop" and e.ids[-1] == zebra and len(e.ids) == 7 for e in out)


def test_embedding_replacement_refuses_bad_markers(make_tiny):
    lm = make_tiny("llama")
    with pytest.raises(ValueError, match="exactly one known token"):
        EmbeddingReplacementVerbalizer(
            lm, template="<c>{injection_char}</c>", marker="㎡", injection_scale=1.0
        )
    with pytest.raises(ValueError, match="exactly once"):
        EmbeddingReplacementVerbalizer(lm, template="no marker here", marker="§", injection_scale=1.0)
    with pytest.raises(ValueError, match="neighbour"):
        EmbeddingReplacementVerbalizer(
            lm, template="<c>{injection_char}</c>", marker="§", injection_scale=1.0, left_neighbor_id=1
        )


def _reference_client_text(server_text: str) -> str:
    """How the official reference client reads a sample: the first tagged body, stripped; without a match, the
    server's text exactly as it came (the server leaves out the end-of-turn token that stopped the sample)."""
    m = re.search(r"<explanation>(.*?)</explanation>", server_text, re.DOTALL)
    return server_text if m is None else m.group(1).strip()


@pytest.mark.parametrize(
    ("raw", "how"),
    [
        ("<explanation>\nA cat.\n</explanation>", "tagged"),
        ("junk <explanation>\nA cat.\n\nIt sits.</explanation> more <explanation>x</explanation>", "tagged"),
        ("<explanation>\nA cat sat on", "unclosed"),  # cut at the token budget
        ("junk <explanation> partial text", "unclosed"),
        ("  A cat, written by a verbalizer trained without tags.\n", "untagged"),
        ("only a close tag</explanation>", "untagged"),
        ("", "untagged"),
    ],
)
def test_explanations_are_read_as_the_reference_client_reads_them(raw, how):
    assert read_explanation(raw) == (_reference_client_text(raw), how)


def test_an_unclosed_sample_ended_by_end_of_turn_is_read_without_that_token(make_tiny):
    nla = tiny_official_nla(make_tiny, max_new_tokens=6)
    v = nla.verbalizer
    eos = v.lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    _favour(v.lm, eos, after_calls=2)  # prefix pass + one step: the third token is the end of turn
    forced = encode_piece(v.lm, "<explanation> a")
    out = v.generate(_acts(v.lm, n=2), 1, None, 0.0, PromptOverrides(add_ids=forced))
    tok = v.lm.tokenizer
    for e in out:
        assert e.finish_reason == "eos" and e.ids[-1] == eos
        assert e.raw == tok.decode(e.ids[:-1]) and "<|im_end|>" not in e.raw
        assert (e.text, e.parse) == (e.raw, "unclosed") and e.text.startswith("<explanation> a")
