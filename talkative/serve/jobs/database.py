"""One SQLite database file, used from one thread of its own.

The job store, the batch store, the result cache and the share store keep their tables in the same file under
DATA_DIR. Each of them owns one `Database`: a single worker thread with its own connection (SQLite connections
must stay on the thread that made them), in WAL mode so that readers never wait for the writer, and synchronous
NORMAL (durable across a process crash; a power cut may lose the last commits). Every call runs on that thread,
so the event loop never blocks on the disk and calls of one store are serialised.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class Database:
    def __init__(self, path: Path, name: str) -> None:
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._local = threading.local()

    def connection(self) -> sqlite3.Connection:
        """The calling thread's connection (only ever called on the database's own thread)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)  # unset until first use
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        return self._executor.submit(fn, *args)

    def call_sync(self, fn: Callable[..., T], *args: Any) -> T:
        return self._executor.submit(fn, *args).result()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        def shut() -> None:
            conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
            if conn is not None:
                conn.close()
                self._local.conn = None

        self._executor.submit(shut).result()
        self._executor.shutdown(wait=True)


class Tables:
    """Base of a store whose tables live in a `Database`: its methods that run on the database's thread read
    `_conn()`, and its async API awaits `_call(...)`."""

    db: Database

    def _conn(self) -> sqlite3.Connection:
        return self.db.connection()

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.db.call(fn, *args)

    def close(self) -> None:
        self.db.close()
