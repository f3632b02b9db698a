"""A worker replica's metrics: its scheduler's engine figures under the server's metric names, hidden groups as
the `hidden` series; and the board's rendering of several replicas."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from talkative.serve.catalog.registry import parse_registry
from talkative.serve.cluster.metrics_board import render, snapshot
from talkative.serve.cluster.worker_metrics import worker_registry

REGISTRY = {
    "model_groups": [
        {"group_id": "open", "models": [{"id": "open-1", "checkpoint": "init:x@1"}]},
        {"group_id": "secret", "visible": False, "models": [{"id": "secret-1", "checkpoint": "init:y@1"}]},
    ]
}


@dataclass
class Device:
    name: str
    group_id: str | None
    inflight: int = 0
    slots: int = 2
    works: dict[str, Any] = field(default_factory=dict)
    whole: set[str] = field(default_factory=set)


@dataclass
class Scheduler:
    stats: dict[str, float]
    devices: list[Device]


@dataclass
class Counters:
    stages: dict[str, float]


@dataclass
class Runner:
    scheduler: Scheduler
    counters: Counters


def _registry(runner: Runner) -> CollectorRegistry:
    return worker_registry(runner, parse_registry(REGISTRY))  # type: ignore[arg-type]  # a runner's shape


def _samples(text: bytes) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_a_worker_posts_its_engine_figures_and_hides_groups_nobody_may_see() -> None:
    runner = Runner(
        Scheduler(
            {"engine_batches": 7, "positions": 30, "completed": 2}, [Device("cpu", "secret", inflight=1)]
        ),
        Counters({"verbalize": 1.5}),
    )
    text = generate_latest(_registry(runner))
    got = _samples(text)
    assert got["talkative_engine_batches_total"] == [({}, 7.0)]
    assert got["talkative_positions_analysed_total"] == [({}, 30.0)]
    assert ({"status": "completed"}, 2.0) in got["talkative_worker_jobs_finished_total"]
    assert got["talkative_worker_stage_seconds_total"] == [({"stage": "verbalize"}, 1.5)]
    assert got["talkative_device_group"] == [({"device": "cpu", "group": "hidden"}, 1.0)]
    assert got["talkative_workers_busy"] == [({"device": "cpu"}, 1.0)]
    assert got["talkative_workers"] == [({"device": "cpu"}, 2.0)]
    assert b"secret" not in text
    runner.scheduler.devices[0].group_id = "open"
    text = generate_latest(_registry(runner))
    assert _samples(text)["talkative_device_group"] == [({"device": "cpu", "group": "open"}, 1.0)]


def test_the_board_renders_each_replicas_series_under_one_family() -> None:
    posts = {
        "worker:n:1": snapshot(_registry(Runner(Scheduler({"engine_batches": 3}, []), Counters({})))),
        "worker:n:2": snapshot(_registry(Runner(Scheduler({"engine_batches": 4}, []), Counters({})))),
    }
    text = render(posts)
    assert text.count(b"# TYPE talkative_engine_batches") == 1
    got = _samples(text)["talkative_engine_batches_total"]
    assert sorted((labels["replica"], value) for labels, value in got) == [
        ("worker:n:1", 3.0),
        ("worker:n:2", 4.0),
    ]
