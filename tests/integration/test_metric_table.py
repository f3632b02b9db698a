"""Adding a metric is one entry in the metric table plus its function: a metric added at run time (to a table
built for this test, handed to the NLA, never written into the shared one) shows up in the rows, the summary, the
legend endpoint and the web UI's CSV export, with no other edit."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from nla_reference import tiny_nla
from torch import Tensor

from talkative.nla.analysis import analyze
from talkative.nla.flags import EXCLUDING_FLAGS
from talkative.nla.metrics import METRICS, Metric
from talkative.serve.api.deps import client_identity
from talkative.serve.api.routes import legend

WEB_JS = Path(__file__).resolve().parents[2] / "talkative" / "web" / "js"
TEXT = "The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small lamp."


def max_abs_error(a: Tensor, b: Tensor, _variance: float | None) -> Tensor:
    return (a.float() - b.float()).abs().amax(-1)


EXTRA = Metric(
    name="max_abs_error",
    label="Max error",
    short="Max err.",
    cli="max err",
    title="Largest absolute error of one dimension",
    better="lower",
    formula="max_d |A − Â|",
    meaning="The largest difference between the activation and its reconstruction in any one dimension.",
    compute=max_abs_error,
)


@pytest.fixture(scope="module")
def table():
    return METRICS.with_metric(EXTRA)


@pytest.fixture(scope="module")
def analysis(make_tiny, table):
    nla = dataclasses.replace(tiny_nla(make_tiny, "llama"), metrics=table)
    opts = {
        "optimize_explanations_config": {"best_of_k": 1},
        "no_kl": True,
        "calculate_token_salience": False,
        "return_vectors": True,
    }
    return analyze(nla, TEXT, options=opts)


def test_the_shared_table_is_left_as_it_was(table):
    assert "max_abs_error" not in METRICS.names and table.names == (*METRICS.names, "max_abs_error")


def test_rows_and_summary_report_the_added_metric(analysis):
    rows = analysis.rows
    for r in rows:
        want = max_abs_error(torch.tensor(r["activation"]), torch.tensor(r["reconstruction"]), None)
        assert r["max_abs_error"] == pytest.approx(float(want), rel=1e-5)
    kept = [r["max_abs_error"] for r in rows if not set(r["flags"]) & set(EXCLUDING_FLAGS)]
    assert kept, "the text should have unflagged positions"
    summary = analysis.metadata["summary"]
    assert summary["mean_max_abs_error"] == pytest.approx(sum(kept) / len(kept))


def legend_body(table) -> dict:
    app = FastAPI()
    app.include_router(legend.router)
    app.dependency_overrides[legend.metric_table] = lambda: table
    app.dependency_overrides[client_identity] = lambda: None
    with TestClient(app) as client:
        response = client.get("/api/v1/metrics/legend")
    assert response.status_code == 200
    return response.json()


def test_the_legend_endpoint_describes_the_added_metric(table):
    body = legend_body(table)
    entry = next(m for m in body["metrics"] if m["name"] == "max_abs_error")
    assert entry["better"] == "lower" and entry["summary_key"] == "mean_max_abs_error"
    assert entry["per_row"] is True and entry["formats"] == ["native", "upstream", "official"]
    assert [m["name"] for m in body["metrics"]] == list(table.names)


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the web UI's modules")
def test_the_ui_csv_export_has_a_column_for_the_added_metric(analysis, table, tmp_path):
    rows = [{k: v for k, v in r.items() if k not in ("activation", "reconstruction")} for r in analysis.rows]
    (tmp_path / "legend.json").write_text(json.dumps(legend_body(table)))
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    script = f"""
import {{ readFileSync }} from 'node:fs';
import {{ Legend }} from '{(WEB_JS / "metrics.js").as_uri()}';
import {{ parseAnalyses, toCsv }} from '{(WEB_JS / "files.js").as_uri()}';
const legend = new Legend(JSON.parse(readFileSync('{tmp_path / "legend.json"}', 'utf8')).metrics);
const csv = toCsv(JSON.parse(readFileSync('{tmp_path / "rows.json"}', 'utf8')), legend);
const back = parseAnalyses(csv, 'export.csv', legend)[0].tokens;
console.log(JSON.stringify({{ header: csv.split('\\r\\n')[0], back: back.map((r) => r.max_abs_error) }}));
"""
    out = subprocess.run(
        ["node", "--experimental-default-type=module", "--input-type=module", "-e", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    got = json.loads(out.stdout)
    assert "max_abs_error" in got["header"].split(",")
    assert got["back"] == pytest.approx([r["max_abs_error"] for r in rows])
