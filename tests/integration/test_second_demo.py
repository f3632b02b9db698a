"""The second demo checkpoint as published: it samples in its explanation language, so every explanation parses."""

from __future__ import annotations

from pathlib import Path

import pytest

from talkative.nla.analysis import analyze
from talkative.nla.explanations import parse
from talkative.nla.lm import LMPool
from talkative.nla.loading import open_nla
from talkative.nla.sources import DEFAULT_SOURCE

pytestmark = pytest.mark.integration

CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "smollm2-135m-l12-v2"


def test_every_explanation_of_the_second_demo_parses(smollm2):
    pool = LMPool()
    pool.add(smollm2, DEFAULT_SOURCE)
    nla = open_nla(str(CHECKPOINT), pool=pool)
    assert nla.verbalizer.grammar == "sentence"
    res = analyze(
        nla,
        "Dear Anna, thanks for the recipe: two cups of flour and a pinch of salt.",
        options={"optimize_explanations_config": {"best_of_k": 4}, "calculate_salience": False},
    )
    rows = res.rows
    assert len(rows) > 10
    texts = [r["explanation"] for r in rows]
    assert all(parse(t) is not None for t in texts), [t for t in texts if parse(t) is None]
