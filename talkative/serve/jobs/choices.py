"""Current models: each client's own (its last switch) and the server's default (the administrator's last switch).

They are kept in the store's `model_choices` table (`jobs/migrations.py`), not in a scheduler's memory, because
with several ingress replicas a client's switch lands on one replica and its next request on any other: both must
read the same choice. A request that names no model reads its client's row and the server's in one query on the
primary key, on the submit path, so nothing is cached (a cache would let a replica run a request on the model the
client just switched away from). The server's default is the row whose client is `SERVER`: client keys always carry
a prefix (`key:`, `ip:`, `proxy:`), so the empty key names no client.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .database import Database, Tables

#: the row of the server's default
SERVER = ""


@dataclass(frozen=True)
class Chosen:
    """What the table says for one client: its own choice and the server's default (None: nobody switched)."""

    own: str | None
    server: str | None


class ModelChoices(Tables):
    """The `model_choices` table, on a channel of its own."""

    def __init__(self, database: Database | Path) -> None:
        super().__init__(database, "model-choices")

    # -- on the store's thread ------------------------------------------------------------------------------------
    def _read(self, client: str | None) -> Chosen:
        keys = (SERVER,) if client is None else (SERVER, client)
        marks = ", ".join("?" for _ in keys)
        sql = f"SELECT client, model_id FROM model_choices WHERE client IN ({marks})"
        rows = {r["client"]: r["model_id"] for r in self._conn().execute(sql, keys)}
        return Chosen(own=rows.get(client) if client is not None else None, server=rows.get(SERVER))

    def _upsert(self, client: str, model_id: str) -> None:
        self._conn().execute(
            "INSERT INTO model_choices (client, model_id, chosen_at) VALUES (?, ?, ?) "
            "ON CONFLICT (client) DO UPDATE SET model_id = excluded.model_id, chosen_at = excluded.chosen_at",
            (client, model_id, time.time()),
        )

    def _set_default(self, model_id: str, chooser: str | None) -> None:
        conn = self._conn()
        with conn.transaction():
            self._upsert(SERVER, model_id)
            if chooser is not None:  # the administrator's own choice is the default from now on
                conn.execute("DELETE FROM model_choices WHERE client = ?", (chooser,))

    def _clear(self) -> int:
        return int(self._conn().execute("DELETE FROM model_choices").rowcount)

    # -- async API ------------------------------------------------------------------------------------------------
    async def read(self, client: str | None) -> Chosen:
        """The client's own choice (none for None) and the server's default, in one query."""
        return await self._call(self._read, client)

    async def choose(self, client: str, model_id: str) -> None:
        """A client's switch: its own current model from now on; nobody else's changes."""
        if client == SERVER:
            raise ValueError("the empty client key is the server's default")
        await self._call(self._upsert, client, model_id)

    async def set_default(self, model_id: str, chooser: str | None) -> None:
        """The administrator's switch: the server's default, and `chooser`'s own choice dropped with it."""
        await self._call(self._set_default, model_id, chooser)

    async def clear(self) -> int:
        """Forget every choice (a reset, or the start of a process that owns the store); how many there were."""
        return await self._call(self._clear)
