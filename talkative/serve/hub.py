"""WebSocket connections and who hears what.

Every connection has its own outbox and sender task, so a slow client delays only itself: messages are queued
without waiting, a client whose outbox overflows or whose send takes longer than `WS_SEND_TIMEOUT` is dropped.
Broadcasts iterate over a snapshot of the connections, so clients coming and going never break one (upstream W7).
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

from .jobs import Job, new_id

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

    from .scheduler import Scheduler
    from .settings import Settings

log = logging.getLogger("talkative.serve.hub")

OUTBOX_SIZE = 1024
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

    def send(self, message: Any) -> None:
        if self.closed:
            return
        try:
            self.outbox.put_nowait(message)
        except asyncio.QueueFull:
            log.warning("connection %s is too slow (%d messages waiting); dropping it", self.id, OUTBOX_SIZE)
            self.closed = True
            with contextlib.suppress(asyncio.QueueEmpty):
                self.outbox.get_nowait()
            self.outbox.put_nowait(CLOSE)

    def want_queue_update(self) -> None:
        if not self.update_pending and not self.closed:
            self.update_pending = True
            self.send(QUEUE_UPDATE)


class Hub:
    def __init__(self, scheduler: Scheduler, settings: Settings) -> None:
        self.scheduler = scheduler
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
            with contextlib.suppress(Exception):
                await conn.websocket.close()

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
        for conn in list(self.connections.values()):
            conn.send(message)

    # -- messages -------------------------------------------------------------------------------------------------
    def queue_update(self, conn: Connection) -> dict[str, Any]:
        """Totals for everyone; ids and positions only of this connection's own queued jobs."""
        positions = {job.id: i for i, job in enumerate(self.scheduler.queue, start=1) if job.id in conn.jobs}
        return {
            "type": "queue_update",
            **self.scheduler.queue_summary(),
            "queued_ids": list(positions),
            "queue_positions": positions,
        }
