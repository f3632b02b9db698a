"""Warm-start sentences: computed from the sample's genre, its last tokens and the subject's top next tokens,
within the token budget, and always in the language."""

from __future__ import annotations

import pytest
import torch

from talkative.nla.explanations import MAX_TOKENS, Form, parse
from talkative.nla.train.targets import context_tail, sentence_ids, sentence_rows


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture
def space(tokenizer) -> int:
    (sid,) = _ids(tokenizer, " ")
    return sid


def test_a_sentence_states_the_genre_the_last_tokens_and_the_top_next_tokens(tokenizer, space):
    ctx = _ids(tokenizer, "Whisk the eggs, then add two cups of")
    top = _ids(tokenizer, " flour")[:1] + _ids(tokenizer, " sugar")[:1] + [0, 0, 0]
    ids = sentence_ids(tokenizer, "recipe", ctx, top, Form(True, 3, 2), 24, space_id=space)
    assert len(ids) == 24 and ids[0] == space
    # the quoted words are the context's own tokens before the current one, ending the explanation
    assert ids[-3:] == ctx[-4:-1]
    claims = parse(tokenizer.decode(ids))
    assert claims is not None and claims.genre == "recipe"
    assert claims.quote == tokenizer.decode(ctx[-4:-1]).strip()
    assert claims.next == (tokenizer.decode(top[:1]).strip(), tokenizer.decode(top[1:2]).strip())


def test_a_sentence_too_long_for_the_budget_quotes_less(tokenizer, space):
    ctx = _ids(tokenizer, " antidisestablishmentarianism supercalifragilistic pneumonoultramicroscopic")
    top = _ids(tokenizer, " extraordinarily")[:1] * 2
    long = sentence_ids(tokenizer, "encyclopedia", ctx, top, Form(True, 12, 2), 64, space_id=space)
    short = sentence_ids(tokenizer, "encyclopedia", ctx, top, Form(True, 12, 2), 16, space_id=space)
    assert len(short) == 16 and sum(t != space for t in long) > 16 and short[-1] == ctx[-2]
    assert parse(tokenizer.decode(short)) is not None
    with pytest.raises(ValueError, match="more than t_text"):
        sentence_ids(tokenizer, "encyclopedia", ctx, top, Form(True, 1, 0), 3, space_id=space)


def test_the_demo_form_fits_the_language_budget(tokenizer, space):
    """The chosen form (genre, 2 next tokens, 6 quoted tokens) within MAX_TOKENS on varied text."""
    texts = [
        "The capital of France is Paris.",
        "def reverse(s):\n    return s[::-1]",
        "Dear Ms. Smith, thank you",
    ]
    g = torch.Generator().manual_seed(0)
    for text in texts:
        ctx = torch.tensor([_ids(tokenizer, text)])
        top = torch.randint(0, len(tokenizer), (1, 5), generator=g)
        row = sentence_rows(tokenizer, ["product"], ctx, top, Form(True, 6, 2), MAX_TOKENS, space_id=space)
        assert row.shape == (1, MAX_TOKENS) and parse(tokenizer.decode(row[0].tolist())) is not None


def test_rows_without_a_genre_or_predictions_are_refused(tokenizer, space):
    ctx, top = torch.tensor([[5, 6, 7]]), torch.tensor([[-1, -1, -1]])
    with pytest.raises(ValueError, match="no genre"):
        sentence_rows(tokenizer, [""], ctx, top, Form(), 24, space)
    with pytest.raises(ValueError, match="no next-token predictions"):
        sentence_rows(tokenizer, ["code"], ctx, top, Form(), 24, space)


def test_context_tail_is_the_first_demo_warm_start():
    ctx = torch.tensor([[-1, 4, 5, 6, 7]])
    assert context_tail(ctx, 3, space_id=0).tolist() == [[4, 5, 6]]
    assert context_tail(ctx, 4, space_id=0).tolist() == [[0, 4, 5, 6]]


def test_a_form_that_states_nothing_about_a_sample_is_all_padding(tokenizer, space):
    blank = _ids(tokenizer, "\n\n\n\n")
    ids = sentence_ids(tokenizer, "story", blank, [-1], Form(False, 1, 0), 8, space_id=space)
    assert ids == [space] * 8
