"""What the batch tests share: a fake scheduler whose jobs end when the test says so (one per process, or one
shared by two replicas, standing for the job store every replica's scheduler reads), and the small builders."""

from __future__ import annotations

import asyncio
from typing import Any

from talkative.serve.jobs.batches import ItemSpec
from talkative.serve.jobs.record import CANCELLED, COMPLETED, QUEUED, Job, new_id
from talkative.serve.scheduling.types import SchedulerError
from talkative.serve.settings import Settings


class FakeScheduler:
    """Jobs that end when the test says so; `refuse` answers submissions with a 429 while it is above zero."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}  # unfinished
        self.ended: dict[str, Job] = {}
        self.submitted: list[Job] = []
        self.refuse = 0
        self.forgotten: list[str] = []
        self._futures: dict[str, asyncio.Future[Job]] = {}

    async def submit(
        self, request: dict[str, Any], *, model_id: str, client_request_id: Any, owner: Any
    ) -> Job:
        if self.refuse:
            self.refuse -= 1
            raise SchedulerError(429, "queue full", reason="queue_full", retry_after=1)
        job = Job(id=new_id(), kind="analyze", request=request, model_id=model_id, group_id="g", owner=owner)
        self.jobs[job.id] = job
        self.submitted.append(job)
        return job

    async def forget(self, job_id: str) -> None:
        """The service's delete_job: the job's record, result and cached rows."""
        self.forgotten.append(job_id)

    def recover(self, job: Job) -> None:
        """A job a previous process left unfinished, queued again (as the real scheduler does at start)."""
        job.status = QUEUED
        self.jobs[job.id] = job

    def _future(self, job_id: str) -> asyncio.Future[Job]:
        return self._futures.setdefault(job_id, asyncio.get_running_loop().create_future())

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        if job_id in self.ended:
            return self.ended[job_id]
        return await asyncio.shield(self._future(job_id))  # a waiter cancelled leaves the job to the others

    async def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id) or self.ended.get(job_id)

    async def cancel(self, job_id: str, reason: str = "Cancelled by user") -> Job:
        job = self.jobs[job_id]
        self.end(job, CANCELLED, error=reason)
        return job

    def end(self, job: Job, status: str, n_tokens: int = 3, error: str | None = None) -> None:
        job.status = status
        if status == COMPLETED:
            job.result = {"tokens": [{"position": p} for p in range(n_tokens)], "metadata": {"seed": 1}}
        job.error = error
        self.jobs.pop(job.id, None)
        self.ended[job.id] = job
        self._future(job.id).set_result(job)

    def end_all(self, status: str = COMPLETED) -> None:
        for job in list(self.jobs.values()):
            self.end(job, status)


def settings(**kw: Any) -> Settings:
    return Settings(_env_file=None, max_active_batch_jobs=1, **kw)  # type: ignore[call-arg]


def specs(n: int) -> list[ItemSpec]:
    return [ItemSpec(f"i{k}", {"text": f"text {k}", "options": {}}) for k in range(n)]


async def settle() -> None:
    """Let the feed and the store's thread do what they can now (store calls leave the event loop)."""
    for _ in range(40):
        await asyncio.sleep(0.005)
