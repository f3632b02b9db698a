"""WebSocket connections in process: backpressure on the receive side and the close of a client too slow to read."""

from __future__ import annotations

import asyncio
from typing import Any

from talkative.serve.api.ws.hub import CLOSE, HIGH_WATER, LOW_WATER, OUTBOX_SIZE, TOO_SLOW, Connection


def _connection() -> Connection:
    return Connection(websocket=None, identity=None)  # type: ignore[arg-type]


def test_an_overflowing_outbox_closes_with_1013_and_a_reason() -> None:
    async def run() -> Connection:
        conn = _connection()
        for i in range(OUTBOX_SIZE + 1):
            conn.send({"i": i})
        return conn

    conn = asyncio.run(run())
    assert conn.closed and conn.close_code == TOO_SLOW and "too slow" in conn.close_reason
    items: list[Any] = []
    while not conn.outbox.empty():
        items.append(conn.outbox.get_nowait())
    assert items[-1] is CLOSE and len(items) == OUTBOX_SIZE


def test_the_receive_side_waits_for_the_sender_to_drain() -> None:
    async def run() -> tuple[bool, int, float]:
        conn = _connection()
        for i in range(HIGH_WATER):
            conn.send({"i": i})

        async def sender() -> None:  # what Hub.run_sender does with the outbox
            await asyncio.sleep(0.05)
            while conn.outbox.qsize() > 0:
                conn.outbox.get_nowait()
                if conn.outbox.qsize() <= LOW_WATER:
                    conn.drained.set()
                await asyncio.sleep(0)

        loop = asyncio.get_running_loop()
        task = loop.create_task(sender())
        t0 = loop.time()
        ok = await conn.wait_for_room(5)
        waited = loop.time() - t0
        size = conn.outbox.qsize()
        await task
        return ok, size, waited

    ok, size, waited = asyncio.run(run())
    assert ok and size <= LOW_WATER and waited >= 0.04


def test_a_client_that_never_drains_is_closed_as_too_slow() -> None:
    async def run() -> tuple[bool, Connection]:
        conn = _connection()
        for i in range(HIGH_WATER):
            conn.send({"i": i})
        return await conn.wait_for_room(0.1), conn

    ok, conn = asyncio.run(run())
    assert not ok and conn.closed and conn.close_code == TOO_SLOW and "not read within" in conn.close_reason
