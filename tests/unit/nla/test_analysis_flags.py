"""Known-noisy positions: flagged in their rows (early, BOS, system prompt, norm outlier) and left out of the
summary means, which say how many each flag excluded."""

from __future__ import annotations

import pytest
import torch
from nla_reference import tiny_nla

from talkative.nla.analysis import EARLY_POSITIONS, analyze, position_flags, summarize
from talkative.nla.flags import EXCLUDING_FLAGS

LONG = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small brass lamp and a "
    "notebook."
)


def test_each_rule_flags_its_positions():
    ids = [5] + [100 + i for i in range(19)]
    ids[13] = 5  # a BOS inside the input is flagged too
    norms = torch.ones(20)
    norms[12] = 3.5  # above 3x the median norm
    norms[15] = 2.9  # below
    flags = position_flags(ids, norms, bos_id=5, system_end=3)
    assert flags[0] == ["early_position", "bos", "system_prompt"]
    assert flags[2] == ["early_position", "system_prompt"]
    assert all(flags[i] == ["early_position"] for i in range(3, EARLY_POSITIONS))
    assert flags[12] == ["outlier"] and flags[13] == ["bos"]
    assert set(flags) == set(range(EARLY_POSITIONS)) | {12, 13}
    assert 13 not in position_flags(ids, norms, bos_id=None, system_end=0)


def test_summary_means_leave_flagged_rows_out_and_count_them():
    rows = [
        {"position": 0, "mse": 100.0, "flags": ["early_position", "outlier"], "outlier": True},
        {"position": 11, "mse": 1.0, "flags": []},
        {"position": 12, "mse": 3.0, "flags": []},
        {"position": 13, "mse": 50.0, "flags": ["system_prompt"]},
    ]
    s = summarize(rows)
    assert s["mean_mse"] == pytest.approx(2.0)
    assert (s["positions"], s["positions_in_summary"], s["positions_excluded"]) == (4, 2, 2)
    assert s["excluded_by_flag"] == {
        "early_position": 1,
        "bos": 0,
        "system_prompt": 1,
        "outlier": 1,
        "degenerate": 0,
        "truncated": 0,
    }
    assert summarize(rows[:1])["mean_mse"] is None


@pytest.fixture(scope="module")
def nla(make_tiny):
    return tiny_nla(make_tiny, "llama")


def test_rows_carry_flags_and_the_summary_follows_them(nla):
    opts = {
        "optimize_explanations_config": {"best_of_k": 1},
        "no_kl": True,
        "calculate_token_salience": False,
    }
    res = analyze(nla, LONG, options=opts)
    assert len(res.rows) > EARLY_POSITIONS + 5
    for r in res.rows:
        assert ("early_position" in r["flags"]) == (r["position"] < EARLY_POSITIONS)
        assert r["outlier"] == ("outlier" in r["flags"])
    kept = [r for r in res.rows if not set(r["flags"]) & set(EXCLUDING_FLAGS)]
    summary = res.metadata["summary"]
    assert summary["positions_in_summary"] == len(kept) > 0
    assert summary["mean_mse"] == pytest.approx(sum(r["mse"] for r in kept) / len(kept))
    assert summary["excluded_by_flag"]["early_position"] == EARLY_POSITIONS


def test_the_system_prompt_of_a_chat_is_flagged(nla):
    """SmolLM2's chat template adds a default system prompt when a chat has none; an explicit one replaces it.
    Either way its positions (and the scaffolding that opens the next turn) are flagged, the messages' are not."""
    opts = {"optimize_explanations_config": {"best_of_k": 1}, "no_eval": True}
    tok = nla.subject.tokenizer
    for messages, system_text in (
        (
            [{"role": "user", "content": "Tell me about lighthouses and the sea, please."}],
            "helpful AI assistant",
        ),
        (
            [
                {"role": "system", "content": "Answer in one short sentence."},
                {"role": "user", "content": "Tell me about lighthouses and the sea, please."},
            ],
            "one short sentence",
        ),
    ):
        rows = analyze(nla, messages=messages, options=opts).rows
        system = [r for r in rows if "system_prompt" in r["flags"]]
        assert system and [r["position"] for r in system] == list(range(len(system)))
        assert system_text in tok.decode([r["token_id"] for r in system])
        rest = tok.decode([r["token_id"] for r in rows[len(system) :]])
        assert rest.startswith("Tell me about lighthouses")
    plain = analyze(nla, LONG, options=opts).rows
    assert not any("system_prompt" in r["flags"] for r in plain)
