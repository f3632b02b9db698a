"""Text generation: streamed tokens equal a hand-written decode through the HF model (no cache)."""

from __future__ import annotations

import pytest
import torch
from nla_reference import sharpen

from talkative.nla.generation import (
    GenerationError,
    GenerationRequest,
    GenerationResult,
    _Detok,
    generate,
    stream,
)
from talkative.nla.sampling import gumbel_max, step_seeds, step_uniforms

PROMPT = "Once upon a time, in a small village,"


@pytest.fixture(scope="module")
def lm(make_tiny):
    return sharpen(make_tiny("qwen2", seed=4), 10.0)


def _hand_decode(lm, ids, n, temperature=0.0, top_p=1.0, seeds=None, stops=()):
    """Whole-sequence HF forwards. Sampling is the engine's Gumbel-max with the step seeds over the nucleus (the
    most likely tokens whose mass before them is < top_p), the nucleus chosen here by hand."""
    ids = list(ids)
    out = []
    for t in range(n):
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids])).logits[0, -1].double()
        if temperature == 0:
            tok = int(logits.argmax())
        else:
            p = torch.softmax(logits / temperature, -1)
            order = p.argsort(descending=True, stable=True)
            ps = p[order]
            nucleus = order[(ps.cumsum(0) - ps) < top_p]
            scores = torch.full_like(logits, float("-inf"))
            scores[nucleus] = logits[nucleus] / temperature
            u = step_uniforms(seeds[t : t + 1], len(logits))
            tok = int(gumbel_max(scores.float().unsqueeze(0), u)[0])
        out.append(tok)
        if tok in stops:
            break
        ids.append(tok)
    return out


def test_stream_yields_tokens_one_by_one_and_matches_greedy(lm):
    req = GenerationRequest(text=PROMPT, max_new_tokens=8, temperature=0.0, num_completions=2)
    events = list(stream(lm, req))
    ids = lm.encode(PROMPT)
    want = _hand_decode(lm, ids, 8)
    for c in range(2):
        mine = [e for e in events if e.completion == c]
        assert [e.token_id for e in mine] == want
        assert [e.position for e in mine] == list(range(len(ids), len(ids) + 8))
        assert [e.finish_reason for e in mine] == [None] * 7 + ["length"]
        assert "".join(e.token for e in mine) == lm.tokenizer.decode(want)
    res = generate(lm, req)
    assert res.completions == [lm.tokenizer.decode(want)] * 2 and res.finish_reasons == ["length"] * 2
    assert res.prompt == PROMPT and res.prompt_tokens == len(ids)
    assert res.full_texts()[0] == PROMPT + res.completions[0]


def test_stream_is_lazy(lm):
    it = stream(lm, GenerationRequest(text=PROMPT, max_new_tokens=50, temperature=0.0))
    first = next(it)
    assert first.position == len(lm.encode(PROMPT)) and first.finish_reason is None
    it.close()


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5)])
def test_sampling_with_top_p_matches_a_hand_decode(lm, temperature, top_p):
    req = GenerationRequest(
        text=PROMPT, max_new_tokens=6, temperature=temperature, top_p=top_p, seed=3, num_completions=3
    )
    res = generate(lm, req)
    seeds = step_seeds(3, [(0,), (1,), (2,)], 6)
    ids = lm.encode(PROMPT)
    for c in range(3):
        assert res.token_ids[c] == _hand_decode(lm, ids, 6, temperature, top_p, seeds[c])


def test_top_p_samples_only_from_the_nucleus(lm):
    def first_tokens(top_p):
        req = GenerationRequest(
            text=PROMPT, max_new_tokens=1, temperature=1.0, top_p=top_p, num_completions=64
        )
        return {t[0] for t in generate(lm, req).token_ids}

    with torch.no_grad():
        p = torch.softmax(lm.model(torch.tensor([lm.encode(PROMPT)])).logits[0, -1].double(), -1)
    ps, order = p.sort(descending=True)
    nucleus = set(order[(ps.cumsum(0) - ps) < 0.3].tolist())
    assert 1 < len(nucleus) < len(p) // 10
    narrow, wide = first_tokens(0.3), first_tokens(1.0)
    assert narrow <= nucleus and len(narrow) > 1
    assert not wide <= nucleus


def test_seed_reproduces_and_completions_do_not_depend_on_each_other(lm):
    def run(seed, n):
        return generate(lm, GenerationRequest(text=PROMPT, max_new_tokens=6, seed=seed, num_completions=n))

    a, b, c = run(5, 3), run(5, 3), run(6, 3)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert run(5, 1).token_ids[0] == a.token_ids[0]  # completion 0 is completion 0 whatever n is
    assert len({tuple(t) for t in a.token_ids}) > 1


def _favour(lm, token_id, from_call):
    orig = lm.logits
    calls = []

    def logits(h, *, softcap=True):
        out = orig(h, softcap=softcap)
        calls.append(1)
        if len(calls) >= from_call:
            out = out.clone()
            out[..., token_id] += 1e4
        return out

    lm.logits = logits


def test_stops_at_the_end_of_turn(make_tiny):
    lm = sharpen(make_tiny("qwen2", seed=4), 10.0)
    eot = lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    _favour(lm, eot, from_call=3)  # the third token is the end of turn
    req = GenerationRequest(messages=[{"role": "user", "content": "Hi"}], max_new_tokens=10, temperature=0.0)
    res = GenerationResult(prompt="", prompt_tokens=0)
    events = list(stream(lm, req, res))
    assert len(events) == 3
    assert events[-1].token_id == eot and events[-1].token == "" and events[-1].finish_reason == "stop"
    assert (
        res.finish_reasons == ["stop"]
        and len(res.token_ids[0]) == 2
        and "<|im_end|>" not in res.completions[0]
    )
    assert res.prompt.endswith("<|im_start|>assistant\n")
    # without stopping, generation runs to the budget
    res = generate(
        lm, GenerationRequest(text="Hi", max_new_tokens=5, temperature=0.0, stop_at_end_of_turn=False)
    )
    assert res.finish_reasons == ["length"] and len(res.token_ids[0]) == 5


def test_chat_prompts(lm):
    tok = lm.tokenizer
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I am"}]
    res = generate(lm, GenerationRequest(messages=msgs, max_new_tokens=2, temperature=0.0))
    assert res.prompt == tok.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
    assert res.prompt.endswith("Hello, I am")


def test_incremental_detokenization_emits_whole_characters(lm):
    tok = lm.tokenizer
    ids = tok.encode("a 😡 b", add_special_tokens=False)
    d = _Detok(tok)
    pieces = [d.push(i) for i in ids]
    assert "".join(pieces) == "a 😡 b"
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # the emoji spans several tokens: nothing is emitted until it is whole


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"num_completions": 0}, "num_completions"),
        ({"num_completions": 65}, "num_completions"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"messages": [{"role": "user", "content": "x"}]}, "exactly one of text or messages"),
        ({"text": None}, "exactly one of text or messages"),
        ({"text": None, "messages": []}, "messages is empty"),
        ({"max_prompt_tokens": 2}, "limit"),
    ],
)
def test_bad_requests_are_refused(lm, kw, msg):
    req = GenerationRequest(**{"text": PROMPT, **kw})
    with pytest.raises(GenerationError, match=msg):
        next(stream(lm, req))
