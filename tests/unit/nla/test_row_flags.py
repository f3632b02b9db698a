"""Row flags at their thresholds: low confidence (FVE, else relative RMSE), degenerate explanations (repetition,
script) and truncation; the summary leaves out degenerate and truncated rows, keeps low-confidence ones, and
counts every flag."""

from __future__ import annotations

import pytest
from nla_reference import tiny_nla

from talkative.nla import flags as F
from talkative.nla.analysis import analyze, summarize


def test_low_confidence_at_the_fve_edge_and_the_relative_rmse_fallback():
    assert F.low_confidence(F.LOW_CONFIDENCE_FVE, 5.0) is True
    assert F.low_confidence(F.LOW_CONFIDENCE_FVE + 1e-9, 5.0) is False  # FVE decides when there is one
    assert F.low_confidence(None, F.LOW_CONFIDENCE_RELATIVE_RMSE) is True
    assert F.low_confidence(None, F.LOW_CONFIDENCE_RELATIVE_RMSE - 1e-9) is False
    assert F.low_confidence(None, None) is None


@pytest.mark.parametrize(
    ("text", "share"),
    [
        ("x a x b x c", 0.5),  # 3 of 6 words: exactly the threshold
        ("x a x b x c d e", 3 / 8),
        ("a b a b a b", 1.0),  # a bigram three times
        ("a b c a b d", 0.0),  # a bigram twice: fewer than DEGENERATE_MIN_REPEATS
        ("a a a a a a", 1.0),  # overlapping occurrences are not counted twice
        ("x x x x x", 0.0),  # shorter than DEGENERATE_MIN_WORDS: not judged
    ],
)
def test_repeat_share_counts_non_overlapping_ngrams(text, share):
    assert F.repeat_share(text) == pytest.approx(share)
    assert F.degenerate(text) == (share >= F.DEGENERATE_REPEAT_SHARE)


def test_script_share_at_its_edges():
    assert F.script_share("abc") is None  # too few letters to judge
    assert F.script_share("abcdабвг") == 0.5 and not F.degenerate("abcdабвг")
    assert F.script_share("abcабвг") == pytest.approx(3 / 7) and F.degenerate("abcабвг")
    assert F.degenerate("Привет мир, как дела")
    assert not F.degenerate(
        "café naïve, 1990–1991!"
    )  # accented Latin letters, digits and punctuation are fine


def test_row_flags_in_order_and_truncation_only_for_free_length():
    row = {"explanation": "the the the the the the", "fve": -0.2, "finish_reason": "length"}
    assert F.row_flags(row, free_length=True) == ["low_confidence", "degenerate", "truncated"]
    assert F.row_flags(row, free_length=False) == ["low_confidence", "degenerate"]
    fine = {"explanation": "a sea bird near the coast", "fve": 0.4, "finish_reason": "stop"}
    assert F.row_flags(fine, free_length=True) == []
    assert (
        F.row_flags({"explanation": "a sea bird", "fve": None, "relative_rmse": None}, free_length=True) == []
    )


def test_a_cached_row_takes_the_position_flags_of_its_new_input():
    row = {"position": 3, "flags": ["early_position", "outlier", "degenerate"], "outlier": True}
    moved = F.with_position_flags(row, ["early_position"])
    assert moved["flags"] == ["early_position", "degenerate"] and moved["outlier"] is False


def test_summary_keeps_low_confidence_rows_and_leaves_out_degenerate_and_truncated():
    rows = [
        {"position": 11, "mse": 1.0, "flags": []},
        {"position": 12, "mse": 3.0, "flags": ["low_confidence"]},
        {"position": 13, "mse": 50.0, "flags": ["degenerate"]},
        {"position": 14, "mse": 70.0, "flags": ["low_confidence", "truncated"]},
    ]
    s = summarize(rows)
    assert s["mean_mse"] == pytest.approx(2.0)
    assert (s["positions_in_summary"], s["positions_excluded"]) == (2, 2)
    assert s["excluded_by_flag"]["degenerate"] == 1 and s["excluded_by_flag"]["truncated"] == 1
    assert "low_confidence" not in s["excluded_by_flag"]
    assert s["flagged"]["low_confidence"] == 2


@pytest.fixture(scope="module")
def nla(make_tiny):
    return tiny_nla(make_tiny, "llama")


def test_engine_rows_carry_row_flags_that_agree_with_their_metrics(nla):
    opts = {
        "optimize_explanations_config": {"best_of_k": 2},
        "no_kl": True,
        "calculate_token_salience": False,
    }
    res = analyze(nla, "The harbour lights came on one by one as the fog rolled in.", options=opts)
    for r in res.rows:
        assert ("low_confidence" in r["flags"]) == bool(F.low_confidence(r["fve"], r["relative_rmse"]))
        assert ("degenerate" in r["flags"]) == F.degenerate(r["explanation"])
        assert "truncated" not in r["flags"]  # the tiny NLA's verbalizer writes a fixed length
        assert r["flags"] == [f for f in F.FLAGS if f in r["flags"]]  # position flags first, then row flags
    assert res.metadata["summary"]["flagged"]["low_confidence"] == sum(
        "low_confidence" in r["flags"] for r in res.rows
    )
