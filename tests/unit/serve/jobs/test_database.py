"""DATABASE_URL: which database it selects, other schemes refused at startup, and its password in no message."""

from __future__ import annotations

from pathlib import Path

import pytest
from at_once import at_once
from pydantic import ValidationError

from talkative.serve.jobs.database import DatabaseURLError, check_url, open_database, redacted
from talkative.serve.jobs.sqlite import SQLiteDatabase
from talkative.serve.settings import Settings

SECRET = "s3cret-pa55"


def settings(**kw: object) -> Settings:
    return Settings(_env_file=None, **kw)  # type: ignore[arg-type]


def test_other_schemes_are_refused_without_echoing_the_url() -> None:
    for url in (f"mysql://root:{SECRET}@db/talkative", f"sqlite:///{SECRET}.db", f"{SECRET}@host/db"):
        with pytest.raises(ValidationError) as refused:
            settings(database_url=url)
        message = str(refused.value)
        assert "DATABASE_URL" in message and "postgresql://" in message and SECRET not in message
    with pytest.raises(DatabaseURLError, match="the scheme 'mysql'"):
        check_url("mysql://h/db")
    assert settings(database_url=f"postgresql://u:{SECRET}@h/db").database_url.startswith("postgresql://")
    assert settings(database_url=" postgres://h/db ").database_url == "postgres://h/db"
    assert SECRET not in repr(settings(database_url=f"postgresql://u:{SECRET}@h/db"))


def test_redacted_hides_the_password_wherever_it_is() -> None:
    assert (
        redacted(f"postgresql://talk:{SECRET}@db.internal:5433/jobs")
        == "postgresql://talk:***@db.internal:5433/jobs"
    )
    assert redacted(f"postgresql://db/jobs?sslmode=require&password={SECRET}") == (
        "postgresql://db/jobs?sslmode=require&password=***"
    )
    assert redacted("postgresql://talk@db/jobs") == "postgresql://talk@db/jobs"


def test_an_empty_url_is_the_sqlite_file_under_data_dir(tmp_path: Path) -> None:
    database = open_database(settings(data_dir=tmp_path / "data"))
    assert isinstance(database, SQLiteDatabase) and database.path == tmp_path / "data" / "jobs.sqlite3"
    database.close()


def test_an_unreachable_postgresql_fails_at_startup_naming_the_host_not_the_password() -> None:
    from talkative.serve.jobs.postgres import DatabaseUnavailable

    url = f"postgresql://talk:{SECRET}@127.0.0.1:1/jobs?connect_timeout=2"
    with pytest.raises(DatabaseUnavailable) as failed:
        open_database(settings(database_url=url))
    assert "127.0.0.1" in str(failed.value) and SECRET not in str(failed.value)


def test_connections_racing_to_switch_a_new_file_to_wal_all_open(tmp_path: Path) -> None:
    """Six connections opening a new SQLite file at once: SQLite refuses some of the WAL switches at once ("database
    is locked", without waiting; about one six-way race in ten here), so the switch is retried. Sixty races."""
    from talkative.serve.jobs.sqlite import SQLiteConn

    errors: list[BaseException] = []
    for race in range(60):
        path = tmp_path / f"race-{race}.sqlite3"
        errors += at_once(6, lambda path=path: SQLiteConn(path).close())
    assert errors == []
