"""The explanation language: what parses, what its claims are, and when each claim is true."""

from __future__ import annotations

import pytest

from talkative.nla.explanations import GENRE_LABELS, Claims, check_claims, claim_score, parse, render

FULL = 'A recipe. Next likely "flour" or "sugar". Reading: add two cups'


def test_the_full_form_parses_into_its_three_claims():
    assert parse(FULL) == Claims("recipe", "add two cups", ("flour", "sugar"))
    assert parse("      " + FULL + "  ") == parse(FULL)  # padding spaces around it are no part of it


@pytest.mark.parametrize(
    ("claims", "quote", "text"),
    [
        (Claims("code", None, ()), None, "Code."),
        (Claims("news", "the mayor", ()), " the mayor", "A news report. Reading: the mayor"),
        (Claims("email", None, ("Dear",)), None, 'An email. Next likely "Dear".'),
        (Claims(None, "a b", ("c",)), " a\nb", 'Next likely "c". Reading: a\nb'),
        (Claims(None, "x = f(y)", ()), " x = f(y)", "Reading: x = f(y)"),
    ],
)
def test_every_form_render_writes_parses_back(claims, quote, text):
    assert render(claims.genre, quote, claims.next) == text
    assert parse(text) == claims


@pytest.mark.parametrize(
    "text",
    [
        "",
        "A cat.",  # no such genre
        "A recipe",  # no full stop
        "A recipe.  Reading: x",  # two spaces
        "A recipe Reading: x",
        'A recipe. Next likely "flour" or "sugar" Reading: x',  # the next part unfinished
        'A recipe. Next likely "a" or "b" or "c".',  # at most two next tokens
        'Next likely "x". A recipe.',  # parts out of order
        "A recipe. Reading:   ",  # no words
        "two cups of flour",  # raw context, the first demo's kind of explanation
    ],
)
def test_texts_outside_the_language_do_not_parse(text):
    assert parse(text) is None


def test_render_cleans_the_next_tokens_and_keeps_the_words():
    text = render("story", ' she said "go"', ["  the", '"'])
    assert text == 'A story. Next likely "the" or "\'". Reading: she said "go"'
    assert parse(text) == Claims("story", "she said 'go'", ("the", "'"))
    with pytest.raises(ValueError):
        render(None, None, ())


def test_every_genre_label_parses():
    for key in GENRE_LABELS:
        assert parse(render(key, " x", ["y"])) == Claims(key, "x", ("y",))


def test_claims_are_checked_against_the_sample():
    recent = "Whisk the eggs, then add two cups of"
    top = [" flour", " sugar", " water", " milk", " the"]
    ok = check_claims(FULL, "recipe", recent, top)
    assert (ok.parses, ok.genre, ok.quote, ok.next) == (True, True, True, True)
    wrong = check_claims('A news report. Next likely "salt". Reading: three cups', "recipe", recent, top)
    assert (wrong.parses, wrong.genre, wrong.quote, wrong.next) == (True, False, False, False)
    # only the first next token is the claim checked; words across a line break match the cleaned context
    second = check_claims('A recipe. Next likely "salt" or "flour".', "recipe", recent, top)
    assert second.next is False and second.quote is None
    spanning = check_claims("A recipe. Reading: the eggs, then", "recipe", "Whisk the eggs,\nthen add", top)
    assert spanning.quote is True and spanning.next is None
    assert check_claims("two cups of flour", "recipe", recent, top).parses is False


def test_the_claim_score_is_the_share_of_true_claims_with_the_quote_graded_from_its_end():
    recent = "Whisk the eggs, then add two cups of"
    top = [" flour", " sugar", " water", " milk", " the"]
    assert claim_score(FULL, "recipe", recent, top) == 1.0
    # wrong genre and next token; of the quote "three cups", only the last word occurs in the context
    half_quote = claim_score('A news report. Next likely "salt". Reading: three cups', "recipe", recent, top)
    assert half_quote == pytest.approx((0 + 0 + 1 / 2) / 3)
    # a true first word does not count when the words nearer the token are false
    assert claim_score("A recipe. Reading: two spoons", "recipe", recent, top) == pytest.approx(1 / 3)
    assert claim_score("two cups of flour", "recipe", recent, top) == 0.0  # not in the language
    assert claim_score('Next likely "flour".', "recipe", recent, top) == pytest.approx(1 / 3)
