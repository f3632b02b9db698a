"""What the server tells its operators: `GET /metrics` (Prometheus text for scrapers, the seed's JSON figures for
people and old clients) and `GET /api/gpu_stats` (the host's and devices' figures).

Prometheus format by default; `Accept: application/json` (without text/plain) or `?format=json` gives the
seed's `{total_requests, completed_requests, failed_requests, queue_size, average_processing_time,
active_websocket_connections}` (plus cancelled and rejected counts). The route needs the API key like every API
route: a scraper sends it as a bearer token (Prometheus `authorization: {credentials: ...}`).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import MetricsDep, StatsDep, client_identity

router = APIRouter(dependencies=[Depends(client_identity)])


@router.get(
    "/metrics",
    summary="Prometheus metrics (text), or the seed's figures as JSON",
    responses={
        200: {
            "content": {
                "text/plain": {"schema": {"type": "string"}},
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "total_requests": {"type": "integer"},
                            "completed_requests": {"type": "integer"},
                            "failed_requests": {"type": "integer"},
                            "queue_size": {"type": "integer"},
                            "average_processing_time": {"type": "number"},
                            "active_websocket_connections": {"type": "integer"},
                            "cancelled_requests": {"type": "integer"},
                            "rejected_requests": {
                                "type": "object",
                                "additionalProperties": {"type": "integer"},
                            },
                        },
                    }
                },
            }
        }
    },
    response_class=Response,
)
async def metrics(
    request: Request,
    registry: MetricsDep,
    format: Literal["prometheus", "json"] | None = Query(None, description="json: the seed's JSON figures."),
) -> Response:
    accept = request.headers.get("accept", "")
    wants_json = format == "json" or (
        format is None and "application/json" in accept and "text/plain" not in accept
    )
    if wants_json:
        return JSONResponse(await registry.figures())
    return Response(await registry.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/api/gpu_stats", summary="GPU utilisation and memory (CPU figures when there is no GPU)")
async def gpu_stats(stats: StatsDep) -> dict[str, Any]:
    """With a GPU: the seed's `{available: true, utilization, memory_used, memory_total, memory_percent,
    peak_utilization}` (GB, percent; the first GPU) and every GPU under `devices`; utilisation needs NVML
    (`pynvml`), else it is null. Without one: `available: false`, `devices: {}`. `cpu` always holds the CPU's
    utilisation (since the previous reading), load average and RAM."""
    return stats.gpu_stats()
