"""WebSocket connections and who hears what.

Every connection has its own outbox and sender task, so a slow client delays only itself: messages are queued
without waiting. The receive loop stops reading a connection's frames while its outbox is above a high-water mark
(`HIGH_WATER`) until the sender has brought it down to `LOW_WATER`, so a client sending a burst of frames gets
every answer instead of overflowing its own outbox. A client that really is too slow (its outbox overflows, it
does not drain within `WS_SEND_TIMEOUT`, or one send takes longer than that) is closed with 1013 and a reason.
Broadcasts iterate over a snapshot of the connections, so a client connecting or leaving during a broadcast
never breaks it (changing a dict while iterating over it raises).
`queue_update` is coalesced: at most one is pending per connection, built when it is sent, so it is never stale.

A job's messages go to its subscribers (the connection that submitted it, and any that `subscribe` to it later);
a client that disconnects leaves its jobs running, and can pick their results up by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...catalog import visibility
from ...jobs.record import Job, new_id

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

    from ...catalog.registry import Registry
    from ...scheduling.queue import JobQueue
    from ...settings import Settings

log = logging.getLogger("talkative.serve.api.ws.hub")

OUTBOX_SIZE = 1024
#: the receive loop pauses above this many waiting messages and resumes at LOW_WATER (room stays for broadcasts
#: and job messages that arrive meanwhile)
HIGH_WATER = OUTBOX_SIZE // 2
LOW_WATER = OUTBOX_SIZE // 8
#: the close code of a client too slow to keep up: "try again later" (RFC 6455 1013)
TOO_SLOW = 1013
QUEUE_UPDATE = object()  # outbox marker: build a queue_update for this connection when sending
CLOSE = object()
TERMINAL_TYPES = frozenset({"result", "error", "request_cancelled", "model_switch_complete"})


@dataclass(eq=False)
class Connection:
    websocket: WebSocket
    identity: Any
    id: str = field(default_factory=new_id)
    outbox: asyncio.Queue[Any] = field(default_factory=lambda: asyncio.Queue(OUTBOX_SIZE))
    jobs: set[str] = field(default_factory=set)  # jobs this connection follows
    update_pending: bool = False
    closed: bool = False
    #: the close frame the sender ends with (code, reason); the normal close unless the client was too slow
    close_code: int = 1000
    close_reason: str = ""
    #: set by the sender whenever the outbox is at or below LOW_WATER; the receive loop waits on it
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    def send(self, message: Any) -> None:
        if self.closed:
            return
        try:
            self.outbox.put_nowait(message)
        except asyncio.QueueFull:
            self.close_too_slow(f"too slow: more than {OUTBOX_SIZE} messages waiting")

    def close_too_slow(self, reason: str) -> None:
        """End the connection with 1013 and the reason, after what is already queued (minus one message)."""
        if self.closed:
            return
        log.warning("connection %s is too slow (%s); closing it", self.id, reason)
        self.closed = True
        self.close_code, self.close_reason = TOO_SLOW, reason
        if self.outbox.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.outbox.get_nowait()
        self.outbox.put_nowait(CLOSE)

    async def wait_for_room(self, timeout: float) -> bool:
        """Backpressure for the receive loop: above HIGH_WATER, wait until the sender has drained the outbox to
        LOW_WATER. False (and the connection is closed as too slow) when that takes longer than `timeout`."""
        if self.outbox.qsize() < HIGH_WATER:
            return True
        self.drained.clear()
        if self.outbox.qsize() <= LOW_WATER:
            return True
        try:
            await asyncio.wait_for(self.drained.wait(), timeout)
        except TimeoutError:
            self.close_too_slow(f"too slow: {self.outbox.qsize()} messages not read within {timeout:g} s")
            return False
        return True

    def want_queue_update(self) -> None:
        if not self.update_pending and not self.closed:
            self.update_pending = True
            self.send(QUEUE_UPDATE)


class Hub:
    def __init__(self, queue: JobQueue, registry: Registry, settings: Settings) -> None:
        self.queue = queue  # read only: positions and totals for queue_update
        self.registry = registry
        self.settings = settings
        self.connections: dict[str, Connection] = {}
        self.subscribers: dict[str, set[Connection]] = {}
        self._flush_scheduled = False
        self._ticker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for conn in list(self.connections.values()):
            conn.send(CLOSE)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.settings.queue_update_interval)
            for conn in list(self.connections.values()):
                conn.want_queue_update()

    # -- connections ----------------------------------------------------------------------------------------------
    def attach(self, websocket: WebSocket, identity: Any) -> Connection:
        conn = Connection(websocket=websocket, identity=identity)
        self.connections[conn.id] = conn
        return conn

    def detach(self, conn: Connection) -> None:
        conn.closed = True
        self.connections.pop(conn.id, None)
        for job_id in conn.jobs:
            subs = self.subscribers.get(job_id)
            if subs is not None:
                subs.discard(conn)
                if not subs:
                    del self.subscribers[job_id]
        conn.jobs.clear()

    async def run_sender(self, conn: Connection) -> None:
        """Send the connection's outbox in order until it closes (or a send fails or times out)."""
        try:
            while True:
                message = await conn.outbox.get()
                if conn.outbox.qsize() <= LOW_WATER:
                    conn.drained.set()
                if message is CLOSE:
                    break
                if message is QUEUE_UPDATE:
                    conn.update_pending = False
                    message = self.queue_update(conn)
                await asyncio.wait_for(conn.websocket.send_json(message), self.settings.ws_send_timeout)
        except (TimeoutError, RuntimeError, OSError) as exc:
            log.info("connection %s dropped while sending: %r", conn.id, exc)
        except Exception as exc:  # websockets' ConnectionClosed and friends
            log.info("connection %s closed while sending: %r", conn.id, exc)
        finally:
            conn.closed = True
            conn.drained.set()  # a receive loop waiting for room sees the close at once
            with contextlib.suppress(Exception):
                await conn.websocket.close(conn.close_code, conn.close_reason)

    # -- EventSink ------------------------------------------------------------------------------------------------
    def subscribe(self, job: Job, subscriber: Any) -> None:
        if isinstance(subscriber, Connection) and not subscriber.closed:
            self.subscribers.setdefault(job.id, set()).add(subscriber)
            subscriber.jobs.add(job.id)

    def is_subscribed(self, job_id: str, conn: Connection) -> bool:
        return conn in self.subscribers.get(job_id, ())

    def job_event(self, job: Job, message: dict[str, Any]) -> None:
        subs = self.subscribers.get(job.id)
        if not subs:
            return
        for conn in list(subs):
            conn.send(message)
        kind = str(message.get("type", ""))  # final: TERMINAL_TYPES or a kind's "<…>_complete"
        if job.terminal and (kind in TERMINAL_TYPES or kind.endswith("_complete")):
            for conn in self.subscribers.pop(job.id, set()):
                conn.jobs.discard(job.id)

    def relay(self, job: Job, message: dict[str, Any]) -> None:
        self.job_event(job, message)

    def queue_changed(self) -> None:
        """Coalesce bursts of changes into one queue_update per connection."""
        if self._flush_scheduled:
            return
        self._flush_scheduled = True
        asyncio.get_running_loop().call_later(0.05, self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        for conn in list(self.connections.values()):
            conn.want_queue_update()

    def broadcast(self, message: dict[str, Any]) -> None:
        """To every connection, as each may see it: nothing about groups a client may not know of."""
        registry = self.registry
        for conn in list(self.connections.values()):
            shown = visibility.visible_broadcast(message, registry, conn.identity)
            if shown is not None:
                conn.send(shown)

    # -- messages -------------------------------------------------------------------------------------------------
    def queue_update(self, conn: Connection) -> dict[str, Any]:
        """Totals for everyone; ids and positions only of this connection's own queued jobs."""
        positions = {job.id: i for i, job in enumerate(self.queue.waiting, start=1) if job.id in conn.jobs}
        return {
            "type": "queue_update",
            **self.queue.summary(),
            "queued_ids": list(positions),
            "queue_positions": positions,
        }
