"""The scheduling policy: pure decisions over a snapshot of the queue and the devices.

The scheduler (`scheduler.py`) takes a snapshot — plain dataclasses, copied from its state — asks the policy, and
carries out the decision records it gets back (`Admit`, `Switch`, `Drain`, `StopDraining`, the parts of an engine
batch). Nothing here waits, locks or touches a model, so every rule is tested without an event loop, and a
different policy is one more class with the same three methods, chosen where the app builds the scheduler.

`FifoGroupPhases`, the policy the server runs:

* **Admit in FIFO order, per group.** A job goes to a device that holds its group, is neither loading nor
  draining, and has fewer than `MAX_ACTIVE_JOBS` jobs (the least loaded such device). A later job of a group
  never overtakes an earlier one still waiting.
* **Group phases.** A job for a group no device holds takes an idle device (the one that holds nothing, else the
  one used least recently); when every device is busy, the device with the fewest rows left *drains*: it admits
  nothing new, finishes what it runs, then switches. Running work is never broken by a switch, and phases follow
  the queue's order, so no group starves.
* **Engine batches.** Each batch is led by the ready job served least recently (round-robin: a short request is
  not stuck behind a long one) and filled with the next chunks of jobs with the same batch key, within the lead
  model's row budget (positions × best_of_k ≤ `auto_batch_size_max`) and the lead's rows × tokens cap. Where
  rows cost engine time (a CPU), a batch that completes its lead takes only parts that complete their jobs too.
* **Interactive work first.** The items of a batch job (`jobs/batches.py`) are ordinary analyses marked `batch`,
  and they only take what interactive requests leave: they are routed only when no interactive job waits, at
  most `MAX_ACTIVE_BATCH_JOBS` of them per device (on top of, never counted against, the `MAX_ACTIVE_JOBS`
  interactive places), an engine batch is led by interactive work whenever some is ready, and where rows cost
  engine time a batch led by interactive work takes no batch items' chunks and a batch of batch items holds at
  most a quarter of the row budget. So a short request arriving during a large batch waits for at most one small
  engine batch in flight.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol


# -- the snapshot ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueuedJob:
    """A job waiting in the queue, oldest first."""

    job_id: str
    group_id: str
    takes_place: bool  # admitted, it holds one of the device's MAX_ACTIVE_JOBS places (a switch does not)
    batch: bool = False  # an item of a batch job: it yields to interactive jobs


@dataclass(frozen=True)
class DeviceView:
    """A device as the policy sees it."""

    name: str
    group_id: str | None  # the group it holds (None: nothing, or its group is being replaced)
    loading: str | None
    draining_for: str | None
    active_jobs: int
    busy: bool
    last_used: float
    remaining_rows: int  # engine rows its admitted work still has to run
    batch_jobs: int = 0  # of its active jobs, the batch items (they hold no interactive place)


@dataclass(frozen=True)
class Snapshot:
    queue: tuple[QueuedJob, ...]
    devices: tuple[DeviceView, ...]
    preloading: frozenset[str]  # groups being loaded into the CPU cache (switching to one then is a move)
    max_active_jobs: int
    now: float
    max_batch_jobs: int = 1  # batch items a device runs at once, beside its interactive jobs


@dataclass(frozen=True)
class WorkView:
    """An admitted analysis with positions ready to explain."""

    job_id: str
    key: Hashable  # equal keys: equal k and prompt pieces, so the parts may share a batch
    pending: int  # positions still to explain
    chunk: int  # positions it takes per batch
    best_of_k: int
    max_positions: int  # its rows × tokens cap, in positions
    row_budget: int  # its model's rows per batch (auto_batch_size_max)
    last_served: int
    created_at: float
    batch: bool = False  # an item of a batch job: never leads while interactive work is ready


# -- the decisions ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Admit:
    job_id: str
    device: str


@dataclass(frozen=True)
class Switch:
    """The device loads `group_id` now (it is idle)."""

    device: str
    group_id: str


@dataclass(frozen=True)
class Drain:
    """The device admits no more work for its group, and switches to `group_id` once idle."""

    device: str
    group_id: str


@dataclass(frozen=True)
class StopDraining:
    """Nobody waits for the group the device drains for any more (its jobs were cancelled)."""

    device: str


Decision = Admit | Switch | Drain | StopDraining
#: an engine batch: (job id, positions it takes), the lead first
Batch = list[tuple[str, int]]
#: where rows cost engine time (a CPU), an engine batch of batch items holds at most this fraction of the row
#: budget: an interactive request arriving then waits for a short batch, not a full one, and small batches cost a
#: CPU little throughput (its engine time grows with rows anyway)
BATCH_ROW_SHARE = 4


class SchedulingPolicy(Protocol):
    """A scheduling policy: which job runs where, when a device switches, and what one engine batch holds."""

    name: str

    def route(self, snapshot: Snapshot) -> list[Decision]: ...
    def after_dispatch(self, device: DeviceView, queued_groups: frozenset[str]) -> Decision | None: ...
    def fill_batch(self, ready: Sequence[WorkView], fill_finishing: bool) -> Batch: ...


class FifoGroupPhases:
    """FIFO admission per group, group phases in queue order, round-robin engine batches (see the module)."""

    name = "fifo_group_phases"

    def route(self, snapshot: Snapshot) -> list[Decision]:
        """Admissions, switches and drains for the queue, in order; later jobs see the earlier decisions.
        Interactive jobs first; batch items only once no interactive job is left waiting."""
        devices = list(snapshot.devices)
        decisions: list[Decision] = []
        interactive = [q for q in snapshot.queue if not q.batch]
        waiting = self._route(interactive, devices, decisions, snapshot, batch=False)
        if not waiting:
            self._route([q for q in snapshot.queue if q.batch], devices, decisions, snapshot, batch=True)
        return decisions

    def _route(
        self,
        queue: Sequence[QueuedJob],
        devices: list[DeviceView],
        decisions: list[Decision],
        snapshot: Snapshot,
        *,
        batch: bool,
    ) -> set[str]:
        """Route one class of jobs (interactive or batch) in queue order, appending to `decisions` and updating
        `devices`; the groups left with a job waiting."""
        waiting: set[str] = set()  # groups with an older job still waiting: keep FIFO inside a group
        for queued in queue:
            gid = queued.group_id
            if gid in waiting:
                continue
            target = self._device_for(devices, gid, snapshot, batch=batch)
            if target is not None:
                decisions.append(Admit(queued.job_id, devices[target].name))
                dev = devices[target]
                if queued.takes_place:
                    dev = replace(
                        dev, active_jobs=dev.active_jobs + 1, batch_jobs=dev.batch_jobs + batch, busy=True
                    )
                devices[target] = replace(dev, last_used=snapshot.now)
                continue
            waiting.add(gid)
            if gid in snapshot.preloading:
                continue
            if any(d.loading == gid or d.draining_for == gid for d in devices):
                continue
            idle = [i for i, d in enumerate(devices) if not d.busy and d.draining_for is None]
            if idle:
                i = min(idle, key=lambda i: (devices[i].group_id is not None, devices[i].last_used))
                decisions.append(Switch(devices[i].name, gid))
                devices[i] = replace(devices[i], loading=gid, draining_for=None, busy=True)
                continue
            if any(d.group_id == gid for d in devices):
                continue  # its group is being served, just full; no switch needed
            candidates = [i for i, d in enumerate(devices) if d.draining_for is None and d.loading is None]
            if candidates:
                i = min(candidates, key=lambda i: devices[i].remaining_rows)
                decisions.append(Drain(devices[i].name, gid))
                devices[i] = replace(devices[i], draining_for=gid)
        return waiting

    @staticmethod
    def _device_for(
        devices: Sequence[DeviceView], gid: str, snapshot: Snapshot, *, batch: bool
    ) -> int | None:
        """The least loaded device serving `gid` with a place for the job: interactive jobs count only each
        other against MAX_ACTIVE_JOBS, batch items have their own MAX_ACTIVE_BATCH_JOBS places."""

        def room(d: DeviceView) -> bool:
            if batch:
                return d.batch_jobs < snapshot.max_batch_jobs
            return d.active_jobs - d.batch_jobs < snapshot.max_active_jobs

        fits = [
            i
            for i, d in enumerate(devices)
            if d.group_id == gid and d.loading is None and d.draining_for is None and room(d)
        ]
        return min(fits, key=lambda i: devices[i].active_jobs) if fits else None

    def after_dispatch(self, device: DeviceView, queued_groups: frozenset[str]) -> Decision | None:
        """A draining device stops draining when nobody waits for its next group, and switches once idle."""
        if device.draining_for is None:
            return None
        if device.draining_for not in queued_groups:
            return StopDraining(device.name)
        if not device.busy:
            return Switch(device.name, device.draining_for)
        return None

    def fill_batch(self, ready: Sequence[WorkView], fill_finishing: bool) -> Batch:
        """One engine batch: the lead's next chunk, then chunks of jobs with its key while the budgets allow."""
        order = sorted(ready, key=lambda w: (w.batch, w.last_served, w.created_at))
        lead = order[0]
        k = lead.best_of_k
        # a batch that completes its lead takes, where rows cost time, only parts that complete their jobs too
        only_whole = lead.pending <= lead.chunk and not fill_finishing
        # where rows cost time, batch items' rows would only delay the interactive request leading the batch
        no_batch_items = not lead.batch and not fill_finishing
        # and a batch of batch items stays small there, so that a request arriving waits for little
        budget = lead.row_budget // BATCH_ROW_SHARE if lead.batch and not fill_finishing else lead.row_budget
        budget = max(budget, k)
        taken = min(lead.chunk, lead.pending, budget // k)
        batch: Batch = [(lead.job_id, taken)]
        rows = taken * k
        for other in order[1:]:
            # equal keys mean equal k and prompt pieces, so the lead's rows × tokens cap holds for all parts
            room = min((budget - rows) // k, lead.max_positions - rows // k)
            if room <= 0:
                break
            if other.batch and no_batch_items:
                continue
            if other.key == lead.key and not (only_whole and other.pending > min(other.chunk, room)):
                n = min(other.chunk, room, other.pending)
                batch.append((other.job_id, n))
                rows += n * k
        return batch


#: the policy the server runs unless the app is given another
DEFAULT_POLICY = FifoGroupPhases
