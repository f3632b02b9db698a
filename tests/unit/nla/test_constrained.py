"""Constrained sampling: draws stay in the explanation language and follow the model's own distribution there."""

from __future__ import annotations

import functools

import pytest
import torch
from nla_reference import tiny_nla

from talkative.nla.checkpoint import CheckpointError, build_verbalizer
from talkative.nla.constrained import GRAMMARS, MAX_TRIES, GuidedSampler
from talkative.nla.explanations import completions, parse, viable
from talkative.nla.sampling import sample_next, step_seeds


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("", True),
        ("      ", True),
        ("   A", True),
        ("   A rec", True),
        ("   A recipe.", True),
        ('   A recipe. Next likely "fl', True),
        ('   A recipe. Next likely "flour" or "su', True),
        ('   A recipe. Next likely "flour". Reading: add two cups of', True),
        ("Reading:\n}\"'", True),
        ("   A speech", False),
        ("   An interrogative", False),
        ("   A recipe.  Next", False),  # one space between parts
        ('   Next likely ""', False),
        ('   Next likely " flour"', False),  # a stated token is trimmed
        ("   Reading: x. A recipe.", True),  # anything may follow the words
        ("   A recipe. Code.", False),  # one genre, and parts in order
    ],
)
def test_viable_says_whether_a_text_can_still_parse(text, ok):
    assert viable(text) is ok
    if parse(text) is not None:
        assert viable(text.rstrip())


@functools.cache
def _token_texts(tokenizer) -> list[str]:
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


def _texts(tokenizer):
    return lambda: _token_texts(tokenizer)


def _logits(tokenizer, boost: dict[str, float], rows: int) -> torch.Tensor:
    out = torch.full((rows, len(tokenizer)), -30.0)  # the boosted tokens carry all but a trace of the mass
    for piece, value in boost.items():
        (i,) = tokenizer.encode(piece, add_special_tokens=False)
        out[:, i] = value
    return out


def test_a_struck_draw_is_redrawn_from_the_allowed_tokens_with_the_same_noise(tokenizer):
    """The guided draw equals sampling the logits with every disallowed token removed, seed for seed: the model's
    own distribution restricted to the language, not a fixed repair."""
    boost = {"A": 6.0, " zebra": 8.0, "Code": 5.0, "Next": 4.0, "hello": 7.0}
    logits = _logits(tokenizer, boost, 64)
    seeds = step_seeds(3, [(r,) for r in range(64)], 1)[:, 0]
    guide = GuidedSampler(GRAMMARS["sentence"], tokenizer, [], 64, _texts(tokenizer), 24)
    got = guide.next(logits, 1.0, seeds, steps_left=10)
    allowed = logits.clone()
    for piece in (" zebra", "hello"):
        (i,) = tokenizer.encode(piece, add_special_tokens=False)
        allowed[:, i] = float("-inf")
    want = sample_next(allowed, 1.0, seeds)
    assert got.tolist() == want.tolist()
    assert len(set(want.tolist())) == 3
    assert all(viable(tokenizer.decode([int(t)])) for t in got)
    unguided = sample_next(logits, 1.0, seeds)
    assert any(
        tokenizer.decode([int(t)]).strip() in ("zebra", "hello") for t in unguided
    )  # the test has teeth


def test_greedy_takes_the_most_likely_allowed_token(tokenizer):
    logits = _logits(tokenizer, {" zebra": 9.0, "hello": 8.0, "Code": 7.0, "A": 6.0}, 2)
    got = GuidedSampler(GRAMMARS["sentence"], tokenizer, [], 2, _texts(tokenizer), 24).next(
        logits, 0.0, None, steps_left=10
    )
    assert tokenizer.decode([int(got[0])]) == "Code"


def test_the_last_token_must_complete_a_parsing_text(tokenizer):
    forced = tokenizer.encode("  Code", add_special_tokens=False)
    logits = _logits(tokenizer, {" zebra": 9.0, "hello": 8.0, ".": 2.0}, 3)
    guide = GuidedSampler(GRAMMARS["sentence"], tokenizer, forced, 3, _texts(tokenizer), 24)
    got = guide.next(logits, 0.0, None, steps_left=0)
    assert all(parse(tokenizer.decode([*forced, int(t)])) is not None for t in got)


def test_past_the_tries_the_draw_comes_from_the_whole_vocabulary(tokenizer):
    """More never-viable tokens than MAX_TRIES, all likelier than anything else: the row still gets the likeliest
    token the grammar allows, found over the whole vocabulary."""
    never = [i for i in range(1000, 2000) if not viable(tokenizer.decode([i]))][: MAX_TRIES + 5]
    logits = torch.full((1, len(tokenizer)), -30.0)
    logits[0, never] = 10.0 + torch.arange(len(never), dtype=torch.float)
    (code,) = tokenizer.encode("Code", add_special_tokens=False)
    logits[0, code] = 5.0
    guide = GuidedSampler(GRAMMARS["sentence"], tokenizer, [], 1, _texts(tokenizer), 24)
    tok = guide.next(logits, 0.0, None, steps_left=10)
    assert int(tok[0]) == code and guide.given_up == 0 and guide.guided[0]


def test_a_row_that_cannot_finish_is_given_up_not_repaired(tokenizer):
    """A last step that no single token can complete: the row keeps the model's draw and is reported unparsed."""
    forced = tokenizer.encode("  An encyclop", add_special_tokens=False)
    logits = _logits(tokenizer, {" zebra": 9.0}, 1)
    guide = GuidedSampler(GRAMMARS["sentence"], tokenizer, forced, 1, _texts(tokenizer), 24)
    tok = guide.next(logits, 0.0, None, steps_left=0)
    assert guide.given_up == 1 and not guide.guided[0]
    assert tokenizer.decode([int(tok[0])]) == " zebra"


def test_a_row_only_starts_what_it_can_finish_in_the_tokens_left(tokenizer):
    """Padding and long parts are allowed only while a parsing text still fits in the tokens left: with one token
    left after this one, "An" (whose shortest end, " email.", takes two) and padding give way to "Code"."""
    logits = _logits(tokenizer, {"An": 9.5, " ": 9.0, "\u00a0": 8.5, "Code": 5.0}, 1)
    early = GuidedSampler(GRAMMARS["sentence"], tokenizer, [], 1, _texts(tokenizer), 24)
    assert tokenizer.decode([int(early.next(logits, 0.0, None, steps_left=2)[0])]) == "An"
    late = GuidedSampler(GRAMMARS["sentence"], tokenizer, [], 1, _texts(tokenizer), 24)
    assert tokenizer.decode([int(late.next(logits, 0.0, None, steps_left=1)[0])]) == "Code"


def test_completions_are_the_short_ends_of_a_started_text():
    assert completions("   ") == ["Code."]
    assert completions("  An encyclop") == ["edia entry."]
    assert completions('  A recipe. Next likely "fl')[0] == '".'
    assert completions("  Code. Rea") == ["ding:x"]
    assert completions("  A recipe.") == [""]
    assert completions("  A speech") == []


def test_a_forced_start_outside_the_language_turns_the_guide_off(tokenizer):
    forced = tokenizer.encode("  A speech", add_special_tokens=False)
    guide = GuidedSampler(GRAMMARS["sentence"], tokenizer, forced, 2, _texts(tokenizer), 24)
    logits = _logits(tokenizer, {" zebra": 9.0}, 2)
    assert guide.guided == [False, False]  # not tried and given up: never guided
    assert tokenizer.decode([int(t) for t in guide.next(logits, 0.0, None, steps_left=10)]) == " zebra zebra"
    assert guide.given_up == 0


def _bias(lm, boost: dict[int, float]) -> None:
    """Add fixed biases to every logits call of this LM instance (the tiny model's own logits stay underneath)."""
    orig = lm.logits

    def logits(h, *, softcap=True):
        out = orig(h, softcap=softcap).clone()
        for i, value in boost.items():
            out[..., i] += value
        return out

    lm.logits = logits


def test_a_verbalizer_with_the_sentence_grammar_writes_parsing_explanations(make_tiny, tokenizer):
    nla = tiny_nla(make_tiny, "qwen2", t_text=8)
    free = nla.verbalizer
    settings = {"mode": free.mode, **free.settings(), "grammar": "sentence"}
    assert "grammar" not in free.settings()
    guided = build_verbalizer(settings, free.lm)
    guided.load_state_dict(free.state_dict())
    assert guided.settings()["grammar"] == "sentence"
    ids = {i: 1e3 for i in tokenizer.encode("Code. Reading: the cat", add_special_tokens=False)}
    (zebra,) = tokenizer.encode(" zebra", add_special_tokens=False)
    ids[zebra] = 1e3 + 3  # the likeliest token, never a start in the language
    _bias(free.lm, ids)
    A = torch.randn(4, free.lm.d_model, generator=torch.Generator().manual_seed(0))
    seeds = step_seeds(5, [(r,) for r in range(16)], 8)
    out = guided.generate(A, 4, seeds, 1.0)
    assert all(parse(e.text) is not None for e in out), [e.text for e in out]
    assert sum(parse(e.text) is not None for e in free.generate(A, 4, seeds, 1.0)) < 16


def test_an_unknown_grammar_is_refused(make_tiny):
    nla = tiny_nla(make_tiny, "qwen2")
    v = nla.verbalizer
    with pytest.raises(CheckpointError, match="unknown explanation grammar 'yaml'"):
        build_verbalizer({"mode": v.mode, **v.settings(), "grammar": "yaml"}, v.lm)
