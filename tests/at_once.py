"""Run a function on several threads released together: the races of processes or replicas starting at once."""

from __future__ import annotations

import threading
from collections.abc import Callable


def at_once(n: int, fn: Callable[[], object]) -> list[BaseException]:
    """Call `fn` on `n` threads that start together (a barrier); what they raised, collected for the assertion."""
    start = threading.Barrier(n)
    failures: list[BaseException] = []

    def run() -> None:
        start.wait()
        try:
            fn()
        except BaseException as exc:  # collected: the caller's assertion names it
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures
