"""Current models in the store (`ModelChoices`), on SQLite and PostgreSQL: two handles on one database stand in
for two ingress replicas, so what one writes the other reads at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from talkative.serve.jobs.choices import SERVER, Chosen, ModelChoices
from talkative.serve.jobs.database import Database

OpenDatabase = Callable[[], Database]


def test_a_choice_made_through_one_replica_is_read_through_another(open_database: OpenDatabase) -> None:
    async def body() -> None:
        one, other = ModelChoices(open_database()), ModelChoices(open_database())
        try:
            assert await other.read("key:bob") == Chosen(own=None, server=None)
            await one.choose("key:bob", "a2")
            assert await other.read("key:bob") == Chosen(own="a2", server=None)
            await one.choose("key:bob", "b1")  # a later switch replaces the earlier one
            assert await other.read("key:bob") == Chosen(own="b1", server=None)
            assert await other.read("key:alice") == Chosen(own=None, server=None)
            # the administrator's switch: the server's default, and its own choice dropped
            await other.choose("key:admin", "a2")
            await one.set_default("b1", "key:admin")
            assert await other.read("key:admin") == Chosen(own=None, server="b1")
            assert await other.read("key:bob") == Chosen(own="b1", server="b1")
            assert await other.read(None) == Chosen(own=None, server="b1")
            assert await one.clear() == 2
            assert await other.read("key:bob") == Chosen(own=None, server=None)
            with pytest.raises(ValueError):
                await one.choose(SERVER, "a1")  # the empty key is the server's row, no client's
        finally:
            one.close()
            other.close()

    asyncio.run(body())
