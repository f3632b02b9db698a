"""The jobs not yet finished and the FIFO of those waiting: one object the scheduler changes and others read.

The WebSocket hub reads queue positions and totals from here for its `queue_update` messages, so it needs no
reference to the scheduler (which reports to the hub): the app gives both the same `JobQueue`.
"""

from __future__ import annotations

from ..jobs.record import PROCESSING, Job


class JobQueue:
    def __init__(self) -> None:
        self.waiting: list[Job] = []  # queued jobs, oldest first
        self.jobs: dict[str, Job] = {}  # every job not yet stored as terminal (queued, processing, ending)

    def position(self, job_id: str) -> int | None:
        """1 for the next job to be admitted; None when the job is not waiting."""
        for i, job in enumerate(self.waiting):
            if job.id == job_id:
                return i + 1
        return None

    def summary(self) -> dict[str, int]:
        queued = len(self.waiting)
        processing = sum(1 for j in self.jobs.values() if j.status == PROCESSING)
        return {
            "queue_size": queued + processing,
            "queued_requests": queued,
            "processing_requests": processing,
            "total_active": queued + processing,
        }
