"""The tools' shapes: compact rows keep what an investigation reads, vectors survive both wire forms exactly,
and the bounds a tool schema shows are the server's own."""

from __future__ import annotations

import pytest

from talkative.mcp import shapes as S


def row(**extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "position": 3,
        "token": " Paris",
        "token_id": 7042,
        "explanation": "capital city France",
        "explanation_structured": ["capital", " city", " France"],
        "token_salience": [0.5, -0.1, 0.9],
        "mse": 0.0123456,
        "relative_rmse": 0.81234,
        "fve": None,
        "cosine": 0.5,
        "nmse": 0.7,
        "kl_divergence": 1.23456,
        "logit_lens_top": [["x", 0.1]],
        "norm": 12.0,
        "outlier": True,
        "flags": ["early_position"],
        "layer": 5,
    }
    return base | extra


#: the legend's entries as `GET /api/v1/metrics/legend` gives them, cut down to what compact rows read
LEGEND = [
    {"name": "fve", "role": "headline"},
    {"name": "relative_rmse", "role": "headline"},
    {"name": "cosine", "role": "headline"},
    {"name": "kl_divergence", "role": "headline"},
    {"name": "mse", "role": "detail"},
    {"name": "nmse", "role": "derived"},
]
METRICS = S.compact_metrics(LEGEND)


def test_a_compact_row_keeps_the_token_its_explanation_metrics_flags_and_salient_words() -> None:
    out = S.compact_row(row(), METRICS)
    assert out == {
        "position": 3,
        "token": " Paris",
        "explanation": "capital city France",
        "mse": 0.01235,
        "relative_rmse": 0.8123,
        "cosine": 0.5,
        "kl_divergence": 1.235,
        "flags": ["early_position", "outlier"],
        "salient_words": ["France", "capital", "city"],
    }


def test_compact_rows_keep_the_legends_metrics_but_the_derived_ones_in_its_order() -> None:
    legend = [*LEGEND, {"name": "probe_agreement", "role": "detail"}, {"name": "half_cos", "role": "derived"}]
    metrics = S.compact_metrics(legend)
    assert metrics == ("fve", "relative_rmse", "cosine", "kl_divergence", "mse", "probe_agreement")
    out = S.compact_row(row(probe_agreement=0.123456, half_cos=0.25), metrics)
    assert out["probe_agreement"] == 0.1235 and "half_cos" not in out and "nmse" not in out
    assert "probe_agreement" not in S.compact_row(row(), metrics)  # a metric without a value is left out


def test_salient_words_need_scores_that_match_the_words() -> None:
    assert S.salient_words(row(token_salience=None)) is None
    assert S.salient_words(row(token_salience=[0.1, 0.2])) is None
    assert "salient_words" not in S.compact_row(row(explanation_structured=None), METRICS)


def test_vectors_round_trip_through_base64_and_bad_payloads_say_why() -> None:
    rows = [[0.5, -1.25, 3.0], [1.0, 2.0, 4.5]]
    packed = S.pack(rows)
    assert packed["shape"] == [2, 3] and packed["dtype"] == "float32"
    assert S.unpack(S.PackedVectors(**packed)) == rows
    one = S.PackedVectors(data=S.pack([rows[0]])["data"], shape=[3])
    assert S.unpack(one) == [rows[0]]
    with pytest.raises(ValueError, match="needs 24"):
        S.unpack(S.PackedVectors(data=packed["data"][:8], shape=[2, 3]))
    with pytest.raises(ValueError, match="base64"):
        S.unpack(S.PackedVectors(data="not base64!", shape=[1, 3]))


def test_the_schema_bounds_are_the_servers() -> None:
    from talkative.nla import options, vectors
    from talkative.serve.api import schemas

    assert S.MAX_BEST_OF_K == options.MAX_BEST_OF_K
    assert S.MAX_MESSAGES == options.MAX_MESSAGES
    assert (S.MAX_VECTORS, S.MAX_EXPLANATIONS, S.MAX_POSITIONS) == (
        vectors.MAX_VECTORS,
        vectors.MAX_EXPLANATIONS,
        vectors.MAX_POSITIONS,
    )
    assert S.MAX_EXPLANATION_CHARS == vectors.MAX_EXPLANATION_CHARS
    assert (S.MAX_ID_CHARS, S.MAX_TOKEN_CHARS) == (schemas.MAX_ID_CHARS, schemas.MAX_TOKEN_CHARS)
