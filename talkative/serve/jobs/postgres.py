"""The PostgreSQL database (`DATABASE_URL=postgresql://...`): one store shared by every ingress replica.

Connections come from a `psycopg_pool.ConnectionPool` (at most DATABASE_POOL_SIZE), lent to a store's channel
thread for one call and checked before they are lent (a database restarted meanwhile costs a reconnect, not a
failed call). The threaded pool rather than the async one: the stores run the same synchronous code on SQLite
(whose driver has no async API) and on PostgreSQL, each on a channel thread that keeps its calls in order; an
async pool would need a second copy of every store's calls. Each connection is in autocommit, like the SQLite ones:
a statement commits on its own, and `transaction()` groups the statements that must go together, with an advisory
lock where the work reads before it writes.

The URL's password never reaches a log line: the database is described by `redacted(url)`, and a connection
failure by libpq's message, which names the host, never the password.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, ClassVar

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from .database import Conn, Database, redacted
from .dialect import POSTGRESQL
from .migrations import migrate

log = logging.getLogger("talkative.serve.jobs.postgres")

#: seconds to wait for the database at startup, and for a free connection of the pool on each call
CONNECT_TIMEOUT = 30


class DatabaseUnavailable(RuntimeError):
    """The PostgreSQL store cannot be reached at startup (the message names the host, never the password)."""


class KeyedRow(tuple[Any, ...]):
    """A row readable by position and by column name, like sqlite3.Row, so the stores read both backends alike."""

    names: ClassVar[dict[str, int]] = {}

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self.names[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self.names)


@lru_cache(maxsize=256)
def _row_class(names: tuple[str, ...]) -> type[KeyedRow]:
    return type("KeyedRow", (KeyedRow,), {"names": {n: i for i, n in enumerate(names)}})


def keyed_rows(cursor: Any) -> Any:
    """psycopg row factory: rows as `KeyedRow`s of the cursor's columns."""
    names = tuple(c.name for c in cursor.description or ())
    cls = _row_class(names)
    return lambda values: cls(values)


def lock_key(name: str) -> int:
    """A named lock's advisory-lock key: a signed 64-bit hash of the name, the same in every process."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


class PostgresConn:
    """A psycopg connection as the stores use it: `?` placeholders, autocommit, `transaction(lock=...)`."""

    dialect = POSTGRESQL

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        if not params:  # without parameters psycopg takes the text as it is (a % stays a %)
            return self.raw.execute(sql)
        return self.raw.execute(self.dialect.sql(sql), params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self.raw.cursor() as cur:
            cur.executemany(self.dialect.sql(sql), rows)

    @contextmanager
    def transaction(self, lock: str | None = None) -> Iterator[None]:
        with self.raw.transaction():
            if lock is not None:
                self.raw.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(lock),))
            yield


class PostgresDatabase(Database):
    dialect = POSTGRESQL
    shared = True

    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        self.location = redacted(url)
        options: dict[str, Any] = {"autocommit": True, "row_factory": keyed_rows}
        try:
            with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT, **options) as first:
                migrate(PostgresConn(first))
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(
                f"cannot reach the PostgreSQL job store at {self.location}: {str(exc).strip()}"
            ) from None
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            min_size=1,
            max_size=max(1, pool_size),
            kwargs=options,
            open=False,
            check=ConnectionPool.check_connection,
            timeout=CONNECT_TIMEOUT,
            name="talkative-store",
        )
        try:
            self._pool.open(wait=True, timeout=CONNECT_TIMEOUT)
        except PoolTimeout:
            self._pool.close()
            raise DatabaseUnavailable(
                f"the PostgreSQL job store at {self.location} accepted one connection, then no more"
            ) from None
        log.info("job store: PostgreSQL at %s (pool of at most %d connections)", self.location, pool_size)

    @contextmanager
    def borrow(self) -> Iterator[Conn]:
        with self._pool.connection() as raw:
            yield PostgresConn(raw)

    def close(self) -> None:
        self._pool.close()
