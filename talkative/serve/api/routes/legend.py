"""`GET /api/v1/metrics/legend`: what each reported metric is, from the engine's one metric table.

The web UI builds its legend, colour picker, table columns, summary line and CSV columns from this answer, so a
metric added to `talkative/nla/metrics.py` reaches every view without a copy of its name in JavaScript. Open to
every client that may list the models (the same key check), since it says nothing about any model or job.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from ....nla.metrics import METRICS, MetricTable
from ..deps import client_identity

router = APIRouter(dependencies=[Depends(client_identity)])


def metric_table() -> MetricTable:
    """The table the engine reports (a test overrides this dependency to serve a table of its own)."""
    return METRICS


Table = Annotated[MetricTable, Depends(metric_table)]


@router.get("/api/v1/metrics/legend", summary="Every metric's name, labels, good direction and meaning")
async def legend(table: Table) -> dict[str, Any]:
    """`metrics`: one entry per metric, in the order rows, summaries and exports use: `name` (the row key),
    `label`, `short` (a column header), `cli`, `title`, `better` (`higher` or `lower`), `unit`, `formula`,
    `meaning`, `role` (`headline`, `detail` or `derived`), `digits`, `formats` (the checkpoint formats that
    report it), `summary_key` (its mean in `metadata.summary`) and `per_row` (false for a metric that needs the
    text's context, such as KL, which vector routes leave out)."""
    return {"metrics": table.legend()}
