"""The store tests run on both backends: `database` is a fresh SQLite file, then a fresh PostgreSQL database."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from talkative.serve.jobs.database import Database
from talkative.serve.jobs.sqlite import SQLiteDatabase

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]

OpenDatabase = Callable[[], Database]


@pytest.fixture(params=BACKENDS)
def open_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenDatabase]:
    """Opens the test's database (again: each call is a new `Database` on the same data, as a restarted process or
    another replica would open it); everything opened is closed after the test."""
    opened: list[Database] = []
    if request.param == "sqlite":
        path = tmp_path / "data" / "jobs.sqlite3"

        def make() -> Database:
            return SQLiteDatabase(path)
    else:
        from talkative.serve.jobs.postgres import PostgresDatabase

        url = request.getfixturevalue("pg_url")

        def make() -> Database:
            return PostgresDatabase(url, pool_size=4)

    def open_one() -> Database:
        db = make()
        opened.append(db)
        return db

    yield open_one
    for db in opened:
        db.close()


@pytest.fixture
def database(open_database: OpenDatabase) -> Database:
    return open_database()
