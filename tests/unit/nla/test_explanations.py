"""The explanation language: what parses, what its claims are, and when each claim is true."""

from __future__ import annotations

import pytest

from talkative.nla.explanations import GENRE_LABELS, Claims, check_claims, parse, render

FULL = 'A recipe. Reading "two cups of" — next likely "flour" or "sugar".'


def test_the_full_form_parses_into_its_three_claims():
    assert parse(FULL) == Claims("recipe", "two cups of", ("flour", "sugar"))
    assert parse(FULL + "        ") == parse(FULL)  # padding spaces after the sentence are no part of it


@pytest.mark.parametrize(
    ("claims", "text"),
    [
        (Claims("code", None, ()), "Code."),
        (Claims("news", "the mayor", ()), 'A news report. Reading "the mayor".'),
        (Claims("email", None, ("Dear",)), 'An email. Next likely "Dear".'),
        (Claims(None, "a b", ("c",)), 'Reading "a b" — next likely "c".'),
    ],
)
def test_every_form_render_writes_parses_back(claims, text):
    assert render(claims.genre, claims.quote, claims.next) == text
    assert parse(text) == claims


@pytest.mark.parametrize(
    "text",
    [
        "",
        "A cat.",  # no such genre
        "A recipe",  # no full stop
        'A recipe.  Reading "x".',  # two spaces
        'A recipe. Reading "two cups of" — next likely "flour" or "sugar"',  # unfinished
        'A recipe. Reading "" .',
        'A recipe. Reading "x" — next likely "a" or "b" or "c".',  # at most two next tokens
        "two cups of flour",  # raw context, the first demo's kind of explanation
        'A recipe. Reading "two\ncups".',
    ],
)
def test_texts_outside_the_language_do_not_parse(text):
    assert parse(text) is None


def test_render_cleans_what_it_quotes():
    text = render("story", 'she said "go"\n\nnow', ["  the"])
    assert text == 'A story. Reading "she said \'go\' now" — next likely "the".'
    assert parse(text) is not None
    with pytest.raises(ValueError):
        render(None, None, ())


def test_every_genre_label_parses():
    for key in GENRE_LABELS:
        assert parse(render(key, "x", ["y"])) == Claims(key, "x", ("y",))


def test_claims_are_checked_against_the_sample():
    recent = "Whisk the eggs, then add two cups of"
    top = [" flour", " sugar", " water", " milk", " the"]
    ok = check_claims(FULL, "recipe", recent, top)
    assert (ok.parses, ok.genre, ok.quote, ok.next) == (True, True, True, True)
    wrong = check_claims('A news report. Reading "three cups" — next likely "salt".', "recipe", recent, top)
    assert (wrong.parses, wrong.genre, wrong.quote, wrong.next) == (True, False, False, False)
    # only the first next token is the claim checked; a quote spanning a line break matches the cleaned context
    second = check_claims('A recipe. Reading "of" — next likely "salt" or "flour".', "recipe", recent, top)
    assert second.next is False
    spanning = check_claims('A recipe. Reading "the eggs, then".', "recipe", "Whisk the eggs,\nthen add", top)
    assert spanning.quote is True and spanning.next is None
    assert check_claims("two cups of flour", "recipe", recent, top).parses is False
