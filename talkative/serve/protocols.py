"""uvicorn's protocol classes with two things uvicorn does not do.

* **A deadline for a request's headers.** uvicorn times out an idle keep-alive connection, but once a client has
  sent the first byte of a request it waits for the rest of the headers forever: a client that trickles one header
  byte every few seconds holds a connection (a file descriptor and a parser) for as long as it likes, and a few
  thousand such clients exhaust the server (*slowloris*). `header_timeout_protocol(seconds)` is uvicorn's HTTP
  protocol with a deadline: from a connection's start, and from the first byte of every later request on it, the
  headers must be complete within `seconds`, else the client gets `408 Request Timeout` and the connection is
  closed. Bodies, responses, WebSockets after their upgrade and idle keep-alive connections are untouched.
* **Invalid UTF-8 in a WebSocket text frame** makes uvicorn log a traceback (and close with 1007) per frame, so
  any client can fill the log with them. `Utf8CheckedWebSocketProtocol` hands such a frame to the app as bytes
  instead, and the app answers it like any malformed frame: an `error` message, no traceback.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

log = logging.getLogger("talkative.serve.http")

TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 31\r\nconnection: close\r\n\r\nrequest headers took too long\r\n"
)


def header_timeout_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools, else h11) with a deadline of `seconds` for each request's headers."""
    base: Any = AutoHTTPProtocol

    class HeaderTimeoutProtocol(base):  # type: ignore[misc]
        header_timeout = seconds

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._header_timer: asyncio.TimerHandle | None = None
            super().connection_made(transport)
            self._start_header_timer()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self._between_requests():
                self._start_header_timer()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)
            upgraded = self.transport.get_protocol() is not self
            if upgraded or not self._between_requests():
                self._stop_header_timer()  # the headers are complete: a request (or a WebSocket) is running

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            # uvicorn's protocols hold the current request's cycle, None before the first request
            return self.cycle is None or bool(self.cycle.response_complete)

        def _start_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or not self._between_requests():
                return
            log.info(
                "closing a connection from %s: its request headers were not complete within %g s",
                self.client[0] if self.client else "-",
                self.header_timeout,
            )
            self.transport.write(TIMEOUT_RESPONSE)
            self.transport.close()

    return HeaderTimeoutProtocol


class Utf8CheckedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol (websockets, sans-I/O) that passes a text message which is not valid UTF-8 to
    the app as bytes: the app refuses those with an `error` message (`api/ws/protocol.py`)."""

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text":
            try:
                b"".join(self.frames).decode()
            except UnicodeDecodeError:
                self.curr_msg_data_type = "bytes"
        super().send_receive_event_to_app()
