"""`GET /api/v1/metrics/legend`: the engine's metric table as the web UI reads it, behind the same key check as
the model list, naming exactly the metrics an analysis reports in its rows and summary."""

from __future__ import annotations

from typing import Any

import pytest
from e2e_helpers import Server

from talkative.nla.metrics import METRICS

pytestmark = pytest.mark.e2e


def test_the_legend_names_every_metric_a_result_reports(make_server: Any) -> None:
    srv: Server = make_server()
    r = srv.get("/api/v1/metrics/legend")
    assert r.status_code == 200, r.text
    legend = r.json()["metrics"]
    assert [m["name"] for m in legend] == list(METRICS.names)
    for m in legend:
        assert m["better"] in ("higher", "lower") and m["role"] in ("headline", "detail", "derived")
        assert m["label"] and m["title"] and m["meaning"] and m["formula"]
        assert m["summary_key"] == f"mean_{m['name']}"

    body = srv.wait(srv.analyze("The cat sat on the mat while the dog slept by the warm fire all afternoon."))
    rows, summary = body["result"]["tokens"], body["result"]["metadata"]["summary"]
    assert all({m["name"] for m in legend} <= row.keys() for row in rows)
    assert {m["summary_key"] for m in legend} <= summary.keys()


def test_the_legend_needs_a_key_where_the_model_list_does(make_server: Any) -> None:
    srv: Server = make_server(API_KEY="legend-key")
    for path in ("/api/v2/models", "/api/v1/metrics/legend"):
        assert srv.get(path).status_code == 401
        assert srv.get(path, headers={"Authorization": "Bearer legend-key"}).status_code == 200
