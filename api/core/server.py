"""How `wkvq serve` speaks HTTP: uvicorn's h11 protocol with a deadline for each request head.

uvicorn has no such timeout: a new connection that sends nothing is kept for ever, and its keep-alive timeout is
reset by every byte received, so a client sending a header a byte at a time (slowloris) holds a connection as long
as it likes. Here a connection must send a complete request line and headers within `head_timeout` seconds of its
opening, and of each response it received; otherwise it is closed, after a 408 if it had sent part of a head."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class HeadTimeoutProtocol(H11Protocol):
    def __init__(self, *args: Any, head_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout = head_timeout
        self.head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_received()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request line and headers have arrived
            self._head_received()
        elif self.head_deadline is None:  # a new cycle began once an answered request's body had been read
            self._await_head()

    def on_response_complete(self) -> None:
        self._await_head()  # the next request's head, if the connection is kept
        super().on_response_complete()

    def _await_head(self) -> None:
        self._head_received()
        self.head_deadline = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _head_received(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _head_timed_out(self) -> None:
        self.head_deadline = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:  # part of a head: say why it is closed
            self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()


def http_protocol(head_timeout: float) -> functools.partial[HeadTimeoutProtocol]:
    """uvicorn's `http` option: connections with a `head_timeout` (picklable, for `serve --processes N`)."""
    return functools.partial(HeadTimeoutProtocol, head_timeout=head_timeout)
