"""An ingress replica's hold on the jobs it runs, when several replicas share one job store (`--backend ray`).

Every replica is a *runner* with an id of its own (`runner_id`). A job it accepts is claimed for it at once; it
renews its leases every third of `LEASE_SECONDS`, and writes a job's end only while it still holds the job
(`JobStore.finish`), so a job completes once even when two replicas believed they ran it. A replica that dies stops
renewing: once its leases expire, the next replica to look finds its jobs `adoptable`, claims them and runs them
again (from the start: nothing partial is kept). After a whole-cluster restart every unfinished job is adoptable
at once, so queued and running jobs run again as they do after a restart of one process.

The local backend has no `Leases`: one process owns the whole store and runs every unfinished job again at start.
"""

from __future__ import annotations

import os
import socket
import uuid

from ..jobs.record import Job
from ..jobs.store import JobStore, Renewal


def runner_id() -> str:
    """`<node>:<pid>:<random>`: unique per process start, readable in the store when an operator asks who runs
    a job (a restarted process on the same node and pid is still another runner)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Leases:
    """One runner's lease calls on the shared store, with its id and timing in one place."""

    def __init__(self, store: JobStore, runner: str, lease_seconds: float) -> None:
        self.store = store
        self.runner = runner
        self.lease_seconds = lease_seconds

    @property
    def interval(self) -> float:
        """Seconds between renewals: a third of the lease, so one late renewal never loses a job."""
        return self.lease_seconds / 3

    async def claim(self, job_id: str) -> bool:
        return await self.store.claim(job_id, self.runner, self.lease_seconds)

    async def renew(self) -> Renewal:
        return await self.store.renew(self.runner, self.lease_seconds)

    async def release(self, job_id: str) -> None:
        await self.store.release(job_id, self.runner)

    async def renew_one(self, job_id: str) -> None:
        """Renew now rather than at the next interval (a job just reached a worker after a wait that may have
        used much of its lease); what the renewal found is the scheduler's to read at its next round."""
        await self.renew()

    async def finish(self, job: Job) -> bool:
        """Write the job's end while this runner holds it. True also when this runner wrote that end already
        (the dispatch to a worker and the scheduler may both end a job): False only when another runner took
        the job over or someone else ended it."""
        if await self.store.finish(job, self.runner):
            return True
        stored = await self.store.get(job.id)
        return (
            stored is not None
            and stored.terminal
            and stored.status == job.status
            and await self.store.runner(job.id) == self.runner
        )

    async def close(self) -> None:
        """Nothing to stop: the scheduler that holds these leases renews them."""

    async def adoptable(self) -> list[Job]:
        """Jobs whose runner stopped renewing, or that were never claimed a whole lease after being written."""
        return await self.store.adoptable(self.lease_seconds)
