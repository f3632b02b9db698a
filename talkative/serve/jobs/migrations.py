"""Versioned schema migrations, the same on SQLite and PostgreSQL.

`schema_migrations` records which numbered migrations a database has had. At startup each pending migration runs
in order, once, inside one transaction that holds the schema lock: on PostgreSQL a transaction-scoped advisory
lock, so that two ingress replicas starting at once on one database take turns (the second finds nothing left to
do); on SQLite the database's write lock. A database migrated by a newer Talkative than this one is refused rather
than used with a schema this code does not know.

Version 1 is the schema of the releases before migrations existed: its statements are `IF NOT EXISTS`, so a SQLite
file made by one of them is adopted as version 1 with its data. Add a migration by appending to `MIGRATIONS`; never
edit one that has shipped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .database import Conn

log = logging.getLogger("talkative.serve.jobs.migrations")


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    #: statements; `{double}` is the dialect's double type
    statements: tuple[str, ...]


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer Talkative."""


JOBS_V1 = (
    """CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    model_id TEXT,
    group_id TEXT,
    client_request_id TEXT,
    owner TEXT,
    created_at {double} NOT NULL,
    started_at {double},
    completed_at {double},
    request TEXT NOT NULL,
    result TEXT,
    error TEXT,
    progress TEXT,
    attempts INTEGER NOT NULL DEFAULT 0
)""",
    "CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status)",
    "CREATE INDEX IF NOT EXISTS jobs_completed ON jobs(completed_at)",
    "CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, created_at)",
)
#: batch jobs (jobs/batches.py): a batch, and each of its items with the item's result line once it is done
BATCHES_V1 = (
    """CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    owner TEXT,
    status TEXT NOT NULL,
    model_id TEXT NOT NULL,
    options TEXT NOT NULL,
    source TEXT NOT NULL,
    total INTEGER NOT NULL,
    created_at {double} NOT NULL,
    started_at {double},
    completed_at {double}
)""",
    "CREATE INDEX IF NOT EXISTS batches_owner ON batches(owner, created_at)",
    """CREATE TABLE IF NOT EXISTS batch_items (
    batch_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    item_id TEXT,
    line INTEGER,
    request TEXT,
    status TEXT NOT NULL,
    job_id TEXT,
    done_seq INTEGER,
    positions INTEGER,
    result TEXT,
    PRIMARY KEY (batch_id, seq)
)""",
    "CREATE INDEX IF NOT EXISTS batch_items_done ON batch_items(batch_id, done_seq)",
    "CREATE INDEX IF NOT EXISTS batch_items_status ON batch_items(batch_id, status)",
)
#: the result cache (jobs/cache.py): rows by key, each analysed input's positions, and the job that computed them
CACHE_V1 = (
    """CREATE TABLE IF NOT EXISTS cache_rows (
    key TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    row TEXT NOT NULL,
    size INTEGER NOT NULL,
    used_at {double} NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS cache_rows_job ON cache_rows(job_id)",
    "CREATE INDEX IF NOT EXISTS cache_rows_used ON cache_rows(used_at)",
    """CREATE TABLE IF NOT EXISTS cache_inputs (
    key TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    entry TEXT NOT NULL,
    size INTEGER NOT NULL,
    used_at {double} NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS cache_inputs_job ON cache_inputs(job_id)",
    "CREATE INDEX IF NOT EXISTS cache_inputs_used ON cache_inputs(used_at)",
)
#: shares (jobs/shares.py): a link to one result, anchored at a position or a span, with a comment
SHARES_V1 = (
    """CREATE TABLE IF NOT EXISTS shares (
    id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    owner TEXT,
    anchor TEXT NOT NULL,
    comment TEXT,
    created_at {double} NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS shares_request ON shares(request_id)",
)
#: a job's lease (JobStore.claim/renew/finish): which runner holds it, until when on the database's clock, and
#: whether someone asked that runner to cancel it
LEASES_V2 = (
    "ALTER TABLE jobs ADD COLUMN runner TEXT",
    "ALTER TABLE jobs ADD COLUMN lease_until {double}",
    "ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX IF NOT EXISTS jobs_runner ON jobs(runner)",
)
#: a batch's lease (BatchStore.claim/renew, jobs/batches.py): the runner that feeds its items to a scheduler, until
#: when on the database's clock, and whether someone asked that runner, from any replica, to cancel the batch
BATCH_LEASES_V3 = (
    "ALTER TABLE batches ADD COLUMN runner TEXT",
    "ALTER TABLE batches ADD COLUMN lease_until {double}",
    "ALTER TABLE batches ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX IF NOT EXISTS batches_status ON batches(status)",
)
#: each client's current model and the server's default (jobs/choices.py), kept where every ingress replica reads
#: them: a switch on one replica is what a request on another runs on
MODEL_CHOICES_V4 = (
    """CREATE TABLE IF NOT EXISTS model_choices (
    client TEXT PRIMARY KEY,
    model_id TEXT NOT NULL,
    chosen_at {double} NOT NULL
)""",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "jobs, batches, the result cache and shares", JOBS_V1 + BATCHES_V1 + CACHE_V1 + SHARES_V1),
    Migration(2, "job leases", LEASES_V2),
    Migration(3, "batch leases", BATCH_LEASES_V3),
    Migration(4, "current models", MODEL_CHOICES_V4),
)
LATEST = MIGRATIONS[-1].version

SCHEMA_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at {double} NOT NULL
)"""


def migrate(conn: Conn, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Apply the pending migrations in order, under the schema lock; the versions applied (none when the database
    is up to date, or another replica migrated it first)."""
    d = conn.dialect
    with conn.transaction(lock="talkative:schema"):
        conn.execute(d.schema(SCHEMA_TABLE))
        row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
        current = int(row[0])
        known = migrations[-1].version if migrations else 0
        if current > known:
            raise SchemaTooNew(
                f"the job store's schema is version {current}, newer than this Talkative knows ({known}): "
                "run the Talkative that migrated it, or a newer one"
            )
        applied = []
        for m in migrations:
            if m.version <= current:
                continue
            for statement in m.statements:
                conn.execute(d.schema(statement))
            conn.execute(
                "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                (m.version, m.description, time.time()),
            )
            applied.append(m.version)
    if applied:
        log.info("job store schema migrated to version %d (%s)", applied[-1], ", ".join(map(str, applied)))
    return applied
