"""The result cache: rows already computed are answered again instead of being computed again.

What a row depends on. A position's row is a function of the NLA (its content hash, `nla/identity.py`: files
replaced in place give another identity, a path moved gives the same), the token ids up to and including the
position (the subject is causal, KL reads only the left context), the options that change rows, and the seed:
sampling is seeded per (seed, position, sample) before any model work (`nla/sampling.py`), so no other position
of the request enters a row. Rows are keyed by exactly that, so a text that extends an analysed one finds the rows
of its common prefix. Options that only present (`batch_size`, `last_n_messages`, `use_chat_format`) are not in
the key. One caveat, measured on the tiny model: floating-point reductions depend on the shapes of a forward
(the length of the input, the rows batched together), so a row computed inside a longer input or another batch
may differ in the last bits of its metrics, never in its explanation (Gumbel-max sampling); the server's batch
merging already gives that freedom, and the cache takes no more. A request identical to an analysed one is
answered with exactly the rows it had.

Position flags are not cached: an outlier is judged against the whole input's norms and a system prompt belongs to
the messages, so a reused row takes its flags from the input it now belongs to (`nla.flags.with_position_flags`).

Two tables in the job store's database: `cache_rows` (one row each, with the job that computed it) and
`cache_inputs` (for each analysed input, its positions, their row keys and flags and the metadata of its result,
so that an identical request is answered when it is submitted, without a device). A request whose model is not on
a device (its identity is known only once it is loaded) is looked up row by row after it is prepared. Scoped per
client (its identity key) unless RESULT_CACHE_SHARED: a shared cache answers one client's text from another's
rows, so a fast answer tells that someone analysed that text before. Bounded by RESULT_CACHE_MAX_MB: beyond it the
least recently used rows (and inputs) go first; rows unused for RESULT_RETENTION_DAYS go like the jobs they came
from. Deleting a job removes the rows it computed.

Everything runs on one thread of its own, in submission order: a job's rows are written before its result is
announced, so a request sent after it sees them.

The size is kept by increments, not by a scan per write. On a database other processes write too (PostgreSQL
shared by replicas), each process's count misses the others' writes, so it is read exact again every
`RECOUNT_SECONDS` at the next write: the bound then holds within what the replicas write in that time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ...nla.flags import with_position_flags
from ...nla.options import Resolved
from .database import Database, Tables
from .dialect import upsert

log = logging.getLogger("talkative.serve.jobs.cache")

#: options that change how the work is split or which positions are chosen, never a row
PRESENTATION_OPTIONS = frozenset({"batch_size", "last_n_messages", "chat_format"})
#: metadata of a computed result that describe that run, not the rows: a cached answer resets them
RUN_METADATA = {
    "processing_time": 0.0,
    "stage_seconds": {},
    "queue_seconds": 0.0,
    "engine_batches": [],
    "merged_batches": 0,
    "device": None,
}
#: share of RESULT_CACHE_MAX_MB an eviction brings the cache down to, so that it does not run on every write
EVICT_TO = 0.9
#: on a database shared with other processes, how often the size is counted exact again (a scan of both tables)
RECOUNT_SECONDS = 60.0


class CacheMonitor(Protocol):
    def cache_lookup(self, cached: int, total: int) -> None:
        """A request looked up: `cached` of its `total` positions came from the cache."""


# -- keys ---------------------------------------------------------------------------------------------------------------
def _digest(*parts: str) -> str:
    h = hashlib.blake2b(digest_size=20)
    for part in parts:
        h.update(part.encode())
        h.update(b"\x00")
    return h.hexdigest()


def _plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return repr(value)


def options_key(opts: Resolved) -> str:
    """Every resolved option that changes rows (options added later are in the key until named presentation)."""
    values = {
        f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name not in PRESENTATION_OPTIONS
    }
    return json.dumps(values, sort_keys=True, default=_plain)


def prefix_digests(ids: Sequence[int], positions: Sequence[int]) -> list[str]:
    """For each position, a digest of the token ids up to and including it (a chain: linear in the input)."""
    wanted = set(positions)
    out: dict[int, str] = {}
    h = b""
    for i, token in enumerate(ids):
        h = hashlib.blake2b(h + token.to_bytes(8, "little", signed=True), digest_size=20).digest()
        if i in wanted:
            out[i] = h.hex()
    return [out[p] for p in positions]


def row_key(scope: str, identity: str, options: str, prefix: str) -> str:
    return _digest("row", scope, identity, options, prefix)


def input_key(scope: str, identity: str, options: str, request: dict[str, Any], last_n: int | None) -> str:
    """An analysed input: its text or messages, and which of its positions are analysed."""
    what = {"text": request.get("text"), "messages": request.get("messages"), "last_n_messages": last_n}
    return _digest("input", scope, identity, options, json.dumps(what, sort_keys=True))


@dataclass
class CachePlan:
    """An analysis's keys once it is prepared, and which of its positions the cache answered."""

    input_key: str
    row_keys: dict[int, str]  # position -> key
    flags: dict[int, list[str]]  # position -> its position flags (flagged positions only)
    cached: set[int] = field(default_factory=set)


# -- the cache ----------------------------------------------------------------------------------------------------------
class ResultCache(Tables):
    """The cache's tables, on a channel of their own (its writes never wait behind the job store's calls)."""

    def __init__(
        self,
        database: Database | Path,
        *,
        max_bytes: int,
        shared: bool,
        monitor: CacheMonitor,
        retention_seconds: float | None = None,
    ) -> None:
        super().__init__(database, "result-cache")
        self.max_bytes = max_bytes
        self.retention_seconds = retention_seconds  # rows unused this long go, like the jobs they came from
        self.shared = shared
        self.monitor = monitor
        self._bytes = self.channel.call_sync(self._total)
        self._counted_at = time.monotonic()

    def scope(self, owner: str | None) -> str:
        return "" if self.shared else owner or ""

    # -- on the cache's thread ------------------------------------------------------------------------------------
    def _total(self) -> int:
        conn = self._conn()
        rows = conn.execute("SELECT COALESCE(SUM(size), 0) FROM cache_rows").fetchone()[0]
        inputs = conn.execute("SELECT COALESCE(SUM(size), 0) FROM cache_inputs").fetchone()[0]
        return int(rows) + int(inputs)

    def _rows(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        conn = self._conn()
        out: dict[str, dict[str, Any]] = {}
        for start in range(0, len(keys), 500):  # SQLite binds at most 999 variables per statement
            chunk = list(keys[start : start + 500])
            marks = ",".join("?" * len(chunk))
            for r in conn.execute(f"SELECT key, row FROM cache_rows WHERE key IN ({marks})", chunk):
                out[r["key"]] = json.loads(r["row"])
            conn.execute(f"UPDATE cache_rows SET used_at = ? WHERE key IN ({marks})", (time.time(), *chunk))
        return out

    def _input(self, key: str) -> dict[str, Any] | None:
        conn = self._conn()
        found = conn.execute("SELECT entry FROM cache_inputs WHERE key = ?", (key,)).fetchone()
        if found is None:
            return None
        entry: dict[str, Any] = json.loads(found["entry"])
        rows = self._rows(entry["row_keys"])
        if len(rows) < len(set(entry["row_keys"])):
            return (
                None  # some of its rows were evicted or deleted with their job: prepared and looked up again
            )
        conn.execute("UPDATE cache_inputs SET used_at = ? WHERE key = ?", (time.time(), key))
        flags = {int(q): f for q, f in entry["flags"].items()}
        entry["rows"] = [
            with_position_flags(rows[k], flags.get(q, []))
            for q, k in zip(entry["positions"], entry["row_keys"], strict=True)
        ]
        return entry

    def _record(self, job_id: str, rows: dict[str, str], key: str, entry: str) -> None:
        conn = self._conn()
        now = time.time()
        added = 0  # bytes, less those of the entries replaced: the total is kept without scanning the tables
        # read the old sizes and replace the entries as one: under the write lock (SQLite's BEGIN IMMEDIATE: a
        # transaction that reads first cannot wait for another store's writer on the same file), and one recording
        # at a time across replicas on PostgreSQL
        with conn.transaction(lock="result-cache"):
            # in key order, the order in which a lookup's UPDATE of the same rows (on another replica) locks them:
            # two transactions taking row locks in one order cannot deadlock
            for row_key_, row in sorted(rows.items()):
                added += len(row) - self._size("cache_rows", row_key_)
                conn.execute(
                    upsert("cache_rows", ("key", "job_id", "row", "size", "used_at"), "key"),
                    (row_key_, job_id, row, len(row), now),
                )
            added += len(entry) - self._size("cache_inputs", key)
            conn.execute(
                upsert("cache_inputs", ("key", "job_id", "entry", "size", "used_at"), "key"),
                (key, job_id, entry, len(entry), now),
            )
        self._bytes += added
        if self.database.shared and time.monotonic() - self._counted_at > RECOUNT_SECONDS:
            self._bytes, self._counted_at = self._total(), time.monotonic()
        if self.retention_seconds is not None:
            self._expire(now - self.retention_seconds)
        if self._bytes > self.max_bytes:
            self._evict()

    def _evict(self) -> None:
        """Least recently used first (rows and inputs alike), down to `EVICT_TO` of the bound."""
        conn = self._conn()
        excess = self._bytes - int(self.max_bytes * EVICT_TO)
        freed, cutoff = 0, None
        for r in conn.execute(
            "SELECT size, used_at FROM cache_rows UNION ALL SELECT size, used_at FROM cache_inputs ORDER BY used_at"
        ):
            freed += r["size"]
            cutoff = r["used_at"]
            if freed >= excess:
                break
        if cutoff is not None:
            conn.execute("DELETE FROM cache_rows WHERE used_at <= ?", (cutoff,))
            conn.execute("DELETE FROM cache_inputs WHERE used_at <= ?", (cutoff,))
            log.info("result cache above RESULT_CACHE_MAX_MB: evicted what was last used before %s", cutoff)
        self._bytes = self._total()

    def _expire(self, cutoff: float) -> None:
        """Drop what was last used before `cutoff`: a text stays in the cache no longer than its job would stay
        in the store, unless someone keeps asking for it."""
        conn = self._conn()
        for table in ("cache_rows", "cache_inputs"):
            old = conn.execute(f"SELECT COALESCE(SUM(size), 0) FROM {table} WHERE used_at < ?", (cutoff,))
            self._bytes -= int(old.fetchone()[0])
            conn.execute(f"DELETE FROM {table} WHERE used_at < ?", (cutoff,))

    def _size(self, table: str, key: str) -> int:
        found = self._conn().execute(f"SELECT size FROM {table} WHERE key = ?", (key,)).fetchone()
        return int(found[0]) if found else 0

    def _forget(self, job_id: str) -> int:
        conn = self._conn()
        for table in ("cache_rows", "cache_inputs"):
            gone = conn.execute(f"SELECT COALESCE(SUM(size), 0) FROM {table} WHERE job_id = ?", (job_id,))
            self._bytes -= int(gone.fetchone()[0])
        n = conn.execute("DELETE FROM cache_rows WHERE job_id = ?", (job_id,)).rowcount
        conn.execute("DELETE FROM cache_inputs WHERE job_id = ?", (job_id,))
        return int(n)

    # -- async API ------------------------------------------------------------------------------------------------
    @property
    def size_bytes(self) -> int:
        return self._bytes

    async def rows(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The cached rows among `keys` (key -> row); a failing disk is a miss, never a failed job."""
        try:
            return await self._call(self._rows, keys)
        except Exception:
            log.exception("reading the result cache failed")
            return {}

    async def answer(self, key: str) -> dict[str, Any] | None:
        """An analysed input's entry with its rows (`rows`, flagged for it) and metadata, when every row is
        still cached."""
        try:
            return await self._call(self._input, key)
        except Exception:
            log.exception("reading the result cache failed")
            return None

    def record(
        self, job_id: str, plan: CachePlan, rows: Sequence[dict[str, Any]], metadata: dict[str, Any]
    ) -> None:
        """Keep a completed analysis's computed rows and its input (queued on the cache's thread at once: a
        lookup queued after this sees them)."""
        computed = {
            plan.row_keys[r["position"]]: json.dumps(r, separators=(",", ":"), allow_nan=False)
            for r in rows
            if r["position"] not in plan.cached
        }
        positions = [r["position"] for r in rows]
        entry = {
            "positions": positions,
            "row_keys": [plan.row_keys[q] for q in positions],
            "flags": {str(q): f for q, f in plan.flags.items()},
            "metadata": {k: v for k, v in metadata.items() if k not in ("cached", "positions_cached")},
        }
        dumped = json.dumps(entry, separators=(",", ":"), allow_nan=False)
        future = self.channel.submit(self._record, job_id, computed, plan.input_key, dumped)
        future.add_done_callback(_log_failure)

    async def forget(self, job_id: str) -> int:
        """Remove the rows (and the input) a job computed; how many rows."""
        return await self._call(self._forget, job_id)


def _log_failure(future: Any) -> None:
    if future.exception() is not None:
        log.error("writing to the result cache failed", exc_info=future.exception())


def cached_metadata(entry: dict[str, Any], model_id: str, group_id: str | None) -> dict[str, Any]:
    """The metadata of a request answered whole from the cache: the original result's, less what described its
    run, marked `cached`."""
    return {
        **entry["metadata"],
        **RUN_METADATA,
        "model_id": model_id,
        "group_id": group_id,
        "cached": True,
        "positions_cached": len(entry["rows"]),
    }
