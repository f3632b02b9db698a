"""The database behind the stores, whichever it is: SQLite (the default) or PostgreSQL (`DATABASE_URL`).

The job store, the batch store, the result cache and the share store keep their tables in one database. Each of
them talks to it through a `Channel` of its own: one worker thread that runs the store's calls one after another,
in the order they were made. That order is part of the stores' contract (a job's `put`s land in the order the
scheduler made them; a cached row written before a result is announced is seen by a lookup made after it), so it is
kept on both backends; and the event loop never waits on the disk or the network, because every call runs on the
channel's thread. While a call runs, the channel holds one connection (`Conn`), so a call's statements, and its
transaction, share it.

The backends differ in how a call gets its connection: SQLite keeps one connection per channel thread (a SQLite
connection stays on the thread that made it); PostgreSQL lends one from a `psycopg_pool.ConnectionPool` for the
call (`postgres.py` says why the pool is the threaded one). Where their SQL must differ, the `Dialect` says so.
A database is ready when it is constructed: its schema migrations have run (`migrations.py`).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit

from .dialect import Dialect

if TYPE_CHECKING:
    from ..settings import Settings

T = TypeVar("T")

#: the URL schemes that select PostgreSQL (libpq accepts both)
POSTGRES_SCHEMES = ("postgresql", "postgres")


class DatabaseURLError(ValueError):
    """DATABASE_URL names something other than PostgreSQL. The message never repeats the URL (it may hold a
    password)."""


class Row(Protocol):
    """A result row: by column name or by position, and iterable over its values."""

    def __getitem__(self, key: int | str, /) -> Any: ...
    def __iter__(self) -> Iterator[Any]: ...


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Conn(Protocol):
    """What a store's call sees: SQL written with `?` placeholders (translated by the backend's dialect), each
    statement committed on its own unless inside `transaction()`."""

    dialect: Dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...
    def transaction(self, lock: str | None = None) -> AbstractContextManager[None]:
        """A write transaction, committed when the block ends (rolled back on an exception). Read-then-write work
        names a `lock`: SQLite takes its database-wide write lock at BEGIN (BEGIN IMMEDIATE) whatever the name;
        PostgreSQL takes a transaction-scoped advisory lock on the name, so two replicas doing the same read-then-
        write take turns."""
        ...


class Database(ABC):
    """One database, shared by the stores; each store opens a `Channel` on it."""

    dialect: Dialect
    #: where the data is, for logs: the file, or the URL without its password
    location: str
    #: whether other processes write to it too (replicas sharing PostgreSQL): counts a process keeps go stale
    shared: bool

    @abstractmethod
    def borrow(self) -> AbstractContextManager[Conn]:
        """A connection for one call, on the calling channel thread."""

    def forget_thread(self) -> None:  # noqa: B027 - only SQLite keeps anything per thread
        """Close what the calling thread keeps open (its channel is closing)."""

    @abstractmethod
    def close(self) -> None:
        """Close the database (after every channel on it)."""

    def channel(self, name: str) -> Channel:
        return Channel(self, name)


class Channel:
    """One store's way to the database: a worker thread of its own, calls in submission order, and the connection
    of the call that runs now."""

    def __init__(self, db: Database, name: str) -> None:
        self.db = db
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._current: Conn | None = None  # touched only on the channel's thread

    def conn(self) -> Conn:
        """The connection of the call running now (only called on the channel's thread, inside a call)."""
        assert self._current is not None, "store code runs only inside a channel call"
        return self._current

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        with self.db.borrow() as conn:
            self._current = conn
            try:
                return fn(*args)
            finally:
                self._current = None

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        return self._executor.submit(self._run, fn, *args)

    def call_sync(self, fn: Callable[..., T], *args: Any) -> T:
        return self.submit(fn, *args).result()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, fn, *args)

    def close(self) -> None:
        self._executor.submit(self.db.forget_thread).result()
        self._executor.shutdown(wait=True)


class Tables:
    """Base of a store whose tables live in a `Database`: its methods that run on its channel's thread read
    `_conn()`, and its async API awaits `_call(...)`.

    Given a path instead of a database, the store opens that SQLite file for itself and closes it with itself (a
    store used on its own, as the tests and tools do)."""

    def __init__(self, database: Database | Path, name: str) -> None:
        self._owns_database = not isinstance(database, Database)
        if isinstance(database, Database):
            self.database = database
        else:
            from .sqlite import SQLiteDatabase  # sqlite.py builds on this module

            self.database = SQLiteDatabase(Path(database))
        self.channel = self.database.channel(name)

    @property
    def dialect(self) -> Dialect:
        return self.database.dialect

    def _conn(self) -> Conn:
        return self.channel.conn()

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.channel.call(fn, *args)

    def close(self) -> None:
        self.channel.close()
        if self._owns_database:
            self.database.close()


def redacted(url: str) -> str:
    """A database URL fit for a log line: the password (in the authority or as a parameter) replaced by ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        auth, host = netloc.rsplit("@", 1)
        if ":" in auth:
            auth = auth.split(":", 1)[0] + ":***"
        netloc = f"{auth}@{host}"
    query = "&".join(
        f"{pair.split('=', 1)[0]}=***" if pair.lower().startswith("password=") else pair
        for pair in parts.query.split("&")
        if pair
    )
    out = f"{parts.scheme}://{netloc}{parts.path}"
    return f"{out}?{query}" if query else out


def check_url(url: str) -> str:
    """An empty DATABASE_URL (SQLite under DATA_DIR) or a PostgreSQL one; anything else is refused at startup."""
    url = url.strip()
    if not url:
        return url
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme not in POSTGRES_SCHEMES:
        named = f"the scheme {scheme!r}" if scheme else "no scheme"
        raise DatabaseURLError(
            f"DATABASE_URL has {named}: leave it empty for the SQLite store under DATA_DIR, or give a "
            "postgresql://user:password@host:port/database URL"
        )
    return url


def open_database(settings: Settings) -> Database:
    """The database the settings name (DATABASE_URL): PostgreSQL for a postgresql:// URL, else the SQLite file
    under DATA_DIR. Migrated and ready when it returns; the stores are given it, and it is closed after them."""
    url = check_url(settings.database_url)
    if url:
        # imported only here: psycopg is the optional [cluster] extra, unused by a SQLite server
        from .postgres import PostgresDatabase

        return PostgresDatabase(url, pool_size=settings.database_pool_size)
    from .sqlite import SQLiteDatabase

    return SQLiteDatabase(settings.store_path())
