"""The seed's JSON figures of a cluster: every replica's samples summed into the figures one server gives."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from talkative.serve.jobs.record import Job, new_id
from talkative.serve.observability.metrics import Metrics, cluster_summary

Sample = tuple[str, dict[str, str], float]


def _finished(kind: str, status: str, seconds: float) -> Job:
    job = Job(new_id(), kind, {"text": "x", "options": {}}, model_id="m", group_id="g")
    job.status, job.started_at, job.completed_at = status, 100.0, 100.0 + seconds
    return job


def _samples(registry: CollectorRegistry) -> list[Sample]:
    return [(s.name, dict(s.labels), s.value) for m in registry.collect() for s in m.samples]


def _state(submitted: int, queued: int, processing: int, finished: dict[str, int], ws: int) -> list[Sample]:
    """What a replica's scheduler state reads as at scrape time (its `_StateCollector`)."""
    out: list[Sample] = [
        ("talkative_jobs_submitted_total", {}, float(submitted)),
        ("talkative_jobs", {"status": "queued"}, float(queued)),
        ("talkative_jobs", {"status": "processing"}, float(processing)),
        ("talkative_websocket_connections", {}, float(ws)),
    ]
    return out + [("talkative_jobs_finished_total", {"status": s}, float(n)) for s, n in finished.items()]


def test_the_figures_of_two_replicas_are_summed_and_averaged_over_both() -> None:
    a, b = Metrics(), Metrics()
    a.job_finished(_finished("analyze", "completed", 2.0))
    a.job_finished(_finished("switch", "completed", 50.0))  # a switch is no processing time
    b.job_finished(_finished("analyze", "completed", 4.0))
    b.job_finished(_finished("analyze", "completed", 6.0))
    b.job_finished(_finished("analyze", "failed", 90.0))
    a.reject("queue_full")
    b.reject("queue_full")
    b.reject("rate_limited")
    samples = (
        _samples(a.registry)
        + _state(5, 1, 1, {"completed": 2, "failed": 0, "cancelled": 1}, 2)
        + _samples(b.registry)
        + _state(4, 0, 2, {"completed": 2, "failed": 1, "cancelled": 0}, 1)
    )
    figures = cluster_summary(samples)
    assert figures == {
        "total_requests": 9,
        "completed_requests": 4,
        "failed_requests": 1,
        "queue_size": 4,
        "average_processing_time": 4.0,  # (2 + 4 + 6) / 3
        "active_websocket_connections": 3,
        "cancelled_requests": 1,
        "rejected_requests": {"queue_full": 2, "rate_limited": 1},
    }
    assert a.completed_count + b.completed_count == 3  # what one server's own summary averages over


def test_an_empty_cluster_has_zero_figures() -> None:
    figures = cluster_summary([])
    assert figures["total_requests"] == 0 and figures["average_processing_time"] == 0.0
    assert figures["rejected_requests"] == {}
