"""The SQLite database: one file under DATA_DIR, the embedded default.

Each channel thread keeps one connection (a SQLite connection must stay on the thread that made it), in WAL mode so
that readers never wait for the writer, with synchronous NORMAL (durable across a process crash; a power cut may
lose the last commits). The file holds every user's texts and results: its directory is made 0700 and the file (with
its WAL and shared-memory files) 0600.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .database import Conn, Database
from .dialect import SQLITE
from .migrations import migrate

log = logging.getLogger("talkative.serve.jobs.sqlite")

#: seconds a statement waits for another connection's write lock before failing
BUSY_TIMEOUT = 30
WAL_RETRY_SECONDS = 0.01  # between attempts to switch a new file to WAL while another connection switches it


class SQLiteConn:
    """A sqlite3 connection as the stores use it (autocommit; `transaction` is BEGIN IMMEDIATE)."""

    dialect = SQLITE

    def __init__(self, path: Path) -> None:
        self.raw = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
        self.raw.row_factory = sqlite3.Row
        _enter_wal(self.raw)
        self.raw.execute("PRAGMA synchronous=NORMAL")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self.raw.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.raw.executemany(sql, rows)

    @contextmanager
    def transaction(self, lock: str | None = None) -> Iterator[None]:
        # IMMEDIATE whatever the lock: take the write lock before reading. A transaction that reads first cannot
        # wait for another writer on the same file (its snapshot goes stale: "database is locked" at once).
        self.raw.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.raw.execute("ROLLBACK")
            raise
        self.raw.execute("COMMIT")

    def close(self) -> None:
        self.raw.close()


def _enter_wal(raw: sqlite3.Connection) -> None:
    """Switch the file to WAL, waiting out other connections doing the same. Switching needs the file to itself,
    and SQLite answers "database is locked" at once rather than calling the busy handler when several
    connections race to switch a new file (processes starting together on an empty store: measured 21 of 200
    six-way races here); once the file is in WAL the switch is a no-op that never waits."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            raw.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(WAL_RETRY_SECONDS)


class SQLiteDatabase(Database):
    dialect = SQLITE
    shared = False

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        _private_directory(self.path.parent)
        _private_file(self.path)
        self._local = threading.local()
        first = SQLiteConn(self.path)
        try:
            migrate(first)
        finally:
            first.close()
        _private_file(self.path)  # the WAL files exist now

    @contextmanager
    def borrow(self) -> Iterator[Conn]:
        conn: SQLiteConn | None = getattr(self._local, "conn", None)  # unset until the thread's first call
        if conn is None:
            conn = SQLiteConn(self.path)
            self._local.conn = conn
        yield conn

    def forget_thread(self) -> None:
        conn: SQLiteConn | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def close(self) -> None:
        """Nothing is shared between channels: each closed its own connection."""


def _private_directory(directory: Path) -> None:
    """Create the store's directory 0700: it holds every user's texts and results, for this account only. A
    directory that already exists is the operator's choice and is left as it is, with a warning when others can
    list it."""
    try:
        directory.mkdir(parents=True, mode=0o700)
        os.chmod(directory, 0o700)  # mkdir's mode passes through the umask, which may not be 077
        return
    except FileExistsError:  # there already (or another process starting at once made it first)
        pass
    if directory.stat().st_mode & 0o077:
        log.warning(
            "the job store's directory %s is accessible to other users (mode %o); 0700 keeps their texts private",
            directory,
            stat.S_IMODE(directory.stat().st_mode),
        )


def _private_file(path: Path) -> None:
    """The database (and its WAL and shared-memory files, which SQLite creates with the database's mode) 0600."""
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if part.exists():
            os.chmod(part, 0o600)
