"""The scheduling policy on its own: plain snapshots in, decision records out, no event loop and no model."""

from __future__ import annotations

from dataclasses import replace

from talkative.serve.scheduling.policy import (
    Admit,
    DeviceView,
    Drain,
    FifoGroupPhases,
    QueuedJob,
    Snapshot,
    StopDraining,
    Switch,
    WorkView,
)

POLICY = FifoGroupPhases()
IDLE = DeviceView(
    name="cuda:0",
    group_id="ga",
    loading=None,
    draining_for=None,
    active_jobs=0,
    busy=False,
    last_used=0.0,
    remaining_rows=0,
)


def snapshot(*queue: QueuedJob, devices: tuple[DeviceView, ...] = (IDLE,), **kw: object) -> Snapshot:
    fields: dict[str, object] = {"preloading": frozenset(), "max_active_jobs": 2, "now": 100.0, **kw}
    return Snapshot(queue=queue, devices=devices, **fields)  # type: ignore[arg-type]


def job(job_id: str, group: str = "ga", takes_place: bool = True) -> QueuedJob:
    return QueuedJob(job_id, group, takes_place)


def test_jobs_are_admitted_in_order_up_to_the_device_limit() -> None:
    decisions = POLICY.route(snapshot(job("j1"), job("j2"), job("j3")))
    assert decisions == [Admit("j1", "cuda:0"), Admit("j2", "cuda:0")]  # MAX_ACTIVE_JOBS = 2


def test_a_switch_job_takes_no_place_on_the_device() -> None:
    decisions = POLICY.route(snapshot(job("s", takes_place=False), job("j1"), job("j2")))
    assert decisions == [Admit("s", "cuda:0"), Admit("j1", "cuda:0"), Admit("j2", "cuda:0")]


def test_the_least_loaded_device_of_the_group_is_chosen() -> None:
    busy = replace(IDLE, active_jobs=1, busy=True)
    other = replace(IDLE, name="cuda:1")
    assert POLICY.route(snapshot(job("j1"), devices=(busy, other))) == [Admit("j1", "cuda:1")]


def test_a_group_no_device_holds_takes_an_idle_device_empty_first_then_least_recently_used() -> None:
    used = replace(IDLE, name="cuda:0", last_used=5.0)
    older = replace(IDLE, name="cuda:1", last_used=1.0)
    assert POLICY.route(snapshot(job("b", "gb"), devices=(used, older))) == [Switch("cuda:1", "gb")]
    empty = replace(IDLE, name="cuda:2", group_id=None, last_used=9.0)
    assert POLICY.route(snapshot(job("b", "gb"), devices=(used, older, empty))) == [Switch("cuda:2", "gb")]


def test_when_every_device_is_busy_the_one_with_fewest_rows_left_drains() -> None:
    a = replace(IDLE, name="cuda:0", busy=True, active_jobs=2, remaining_rows=40)
    b = replace(IDLE, name="cuda:1", busy=True, active_jobs=2, remaining_rows=8)
    assert POLICY.route(snapshot(job("x", "gb"), devices=(a, b))) == [Drain("cuda:1", "gb")]
    # one drain per waiting group, and none while the group is loading or already awaited
    assert POLICY.route(snapshot(job("x", "gb"), job("y", "gb"), devices=(a, b))) == [Drain("cuda:1", "gb")]
    waiting = replace(b, draining_for="gb")
    assert POLICY.route(snapshot(job("x", "gb"), devices=(a, waiting))) == []
    assert POLICY.route(snapshot(job("x", "gb"), devices=(a, b), preloading=frozenset({"gb"}))) == []


def test_fifo_within_a_group_and_phases_across_groups() -> None:
    """A later job of group ga waits behind an earlier one that waits; group gb's job takes the idle device."""
    full = replace(IDLE, active_jobs=2, busy=True)
    spare = replace(IDLE, name="cuda:1", group_id="gc")
    decisions = POLICY.route(snapshot(job("b1", "gb"), job("a1"), job("b2", "gb"), devices=(full, spare)))
    assert decisions == [Switch("cuda:1", "gb")]  # a1 waits (its device is full); b2 waits behind b1


def test_a_group_being_served_but_full_causes_no_switch() -> None:
    full = replace(IDLE, active_jobs=2, busy=True)
    assert POLICY.route(snapshot(job("a"), devices=(full,))) == []


def test_a_draining_device_switches_once_idle_and_stops_when_nobody_waits() -> None:
    draining = replace(IDLE, draining_for="gb", busy=True)
    assert POLICY.after_dispatch(draining, frozenset({"gb"})) is None
    assert POLICY.after_dispatch(replace(draining, busy=False), frozenset({"gb"})) == Switch("cuda:0", "gb")
    assert POLICY.after_dispatch(draining, frozenset({"ga"})) == StopDraining("cuda:0")
    assert POLICY.after_dispatch(IDLE, frozenset({"gb"})) is None


def work(
    job_id: str, pending: int, *, chunk: int = 4, k: int = 1, served: int = 0, key: str = "x"
) -> WorkView:
    return WorkView(
        job_id=job_id,
        key=key,
        pending=pending,
        chunk=chunk,
        best_of_k=k,
        max_positions=8 // k,
        row_budget=8,
        last_served=served,
        created_at=float(served),
    )


def test_the_batch_is_led_by_the_job_served_least_recently() -> None:
    batch = POLICY.fill_batch([work("long", 40, served=5), work("short", 3, served=0)], fill_finishing=True)
    assert batch[0] == ("short", 3)


def test_a_batch_is_filled_within_the_row_budget_with_jobs_of_the_same_key_only() -> None:
    batch = POLICY.fill_batch(
        [work("a", 12, served=1), work("b", 12, served=2), work("c", 12, served=3, key="other")],
        fill_finishing=True,
    )
    assert batch == [("a", 4), ("b", 4)]
    best_of_2 = POLICY.fill_batch([work("a", 12, k=2, served=1), work("b", 12, k=2, served=2)], True)
    assert best_of_2 == [("a", 4)]  # 4 positions × k=2 fill the 8 rows


def test_a_batch_that_finishes_its_lead_takes_only_finishing_parts_where_rows_cost_time() -> None:
    ready = [work("short", 2, served=1), work("long", 30, served=2), work("tiny", 1, served=3)]
    assert POLICY.fill_batch(ready, fill_finishing=False) == [("short", 2), ("tiny", 1)]
    assert POLICY.fill_batch(ready, fill_finishing=True) == [("short", 2), ("long", 4), ("tiny", 1)]


# -- batch items yield to interactive jobs ---------------------------------------------------------------------------
def item(job_id: str, group: str = "ga") -> QueuedJob:
    return QueuedJob(job_id, group, takes_place=True, batch=True)


def test_batch_items_are_routed_only_when_no_interactive_job_waits() -> None:
    full = replace(IDLE, active_jobs=2, busy=True)  # its two interactive places are taken
    # an interactive job waits for a place: the batch item waits too, although the device has a batch place
    assert POLICY.route(snapshot(item("b1"), job("i1"), devices=(full,))) == []
    # nobody interactive waits: the batch item takes a batch place beside the interactive jobs
    assert POLICY.route(snapshot(item("b1"), devices=(full,))) == [Admit("b1", "cuda:0")]


def test_an_interactive_job_overtakes_older_batch_items() -> None:
    decisions = POLICY.route(snapshot(item("b1"), item("b2"), job("i1"), max_active_jobs=1, max_batch_jobs=1))
    assert decisions == [Admit("i1", "cuda:0"), Admit("b1", "cuda:0")]


def test_batch_items_have_their_own_bounded_places_and_never_take_interactive_ones() -> None:
    decisions = POLICY.route(snapshot(item("b1"), item("b2"), item("b3"), max_batch_jobs=2))
    assert decisions == [Admit("b1", "cuda:0"), Admit("b2", "cuda:0")]
    busy_with_batch = replace(IDLE, active_jobs=2, batch_jobs=2, busy=True)
    assert POLICY.route(snapshot(item("b3"), devices=(busy_with_batch,), max_batch_jobs=2)) == []
    # the device's two batch items do not count against the interactive places (MAX_ACTIVE_JOBS = 2)
    assert POLICY.route(snapshot(job("i1"), job("i2"), devices=(busy_with_batch,))) == [
        Admit("i1", "cuda:0"),
        Admit("i2", "cuda:0"),
    ]


def test_interactive_work_leads_the_engine_batch_and_batch_rows_stay_out_where_they_cost_time() -> None:
    batch_item = replace(work("item", 12, served=0), batch=True)  # served least recently, yet it yields
    ready = [batch_item, work("short", 2, served=5)]
    assert POLICY.fill_batch(ready, fill_finishing=False) == [("short", 2)]
    assert POLICY.fill_batch(ready, fill_finishing=True) == [("short", 2), ("item", 4)]
    # with no interactive work ready, batch items fill batches among themselves (where rows are nearly free)
    other = replace(work("item2", 12, served=1), batch=True)
    assert POLICY.fill_batch([batch_item, other], fill_finishing=True) == [("item", 4), ("item2", 4)]


def test_where_rows_cost_time_a_batch_of_batch_items_holds_a_quarter_of_the_row_budget() -> None:
    items = [
        replace(work("a", 40, chunk=8, served=1), batch=True),
        replace(work("b", 40, chunk=8, served=2), batch=True),
    ]
    assert POLICY.fill_batch(items, fill_finishing=False) == [("a", 2)]  # 8 rows // 4
    assert POLICY.fill_batch(items, fill_finishing=True) == [("a", 8)]  # rows nearly free: the whole chunk
