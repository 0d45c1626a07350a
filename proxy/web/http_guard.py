"""The HTTP server's own defences, below the app: deadlines, caps, errors.

aiohttp's server has no deadline for a request's headers or body, no cap on
connections, and answers a request it cannot parse with a plain-text 400
that quotes the offending line (an ``Authorization`` header, key included).
``GuardedHandler`` adds, per connection:

- a **header deadline** (``server.header_timeout_s``): from the connection's
  start, or the first byte of a next request on a kept-alive one, to the end
  of the headers; past it the client gets a 408 and the socket is closed (a
  connection that sent nothing at all is just closed);
- a **body deadline** (``server.body_timeout_s``) from the end of the headers
  to the end of the body; past it reading the body raises ``RequestTimeout``,
  which the app renders as a 408, and the connection closes after it;
- a **connection cap** (``server.max_connections``, per worker): a
  connection over it gets a 503 and is closed at once;
- **errors in OpenAI's shape** for everything the parser refuses (431 for
  header lines or counts over the limits), echoing nothing of the request.

Counts for the metrics are kept in ``GuardStats``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from proxy.core.errors import (
    GatewayError,
    HeadersTooLarge,
    InvalidRequest,
    RequestTimeout,
    ServiceUnavailable,
)

log = logging.getLogger("tollway.http")

# Header limits a real client never reaches (browsers and SDKs send well
# under 8 KiB in all); aiohttp's own maxima would let one field be 64 KiB.
MAX_FIELD_BYTES = 16 * 1024
MAX_HEADERS = 100


@dataclass(frozen=True, slots=True)
class Guard:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 10_000


@dataclass(slots=True)
class GuardStats:
    open: int = 0
    refused: int = 0  # connections over max_connections
    header_timeouts: int = 0
    body_timeouts: int = 0
    malformed: int = 0  # requests the HTTP parser refused


def raw_response(err: GatewayError) -> bytes:
    """A whole HTTP/1.1 response for ``err``, for a connection without a request."""
    body = err.body()
    reason = {408: "Request Timeout", 503: "Service Unavailable"}.get(err.status, "Error")
    head = (
        f"HTTP/1.1 {err.status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def parse_error(exc: BaseException | None, status: int) -> GatewayError:
    """What the parser (or aiohttp itself) refused, without quoting the request."""
    if isinstance(exc, LineTooLong) or (
        isinstance(exc, HttpProcessingError) and "too many headers" in str(exc.message).lower()
    ):
        return HeadersTooLarge(
            f"Request headers too large: at most {MAX_HEADERS} header lines of at most "
            f"{MAX_FIELD_BYTES} bytes each."
        )
    if status == 400:
        return InvalidRequest(
            "The request is not valid HTTP/1.1 (malformed request line or header)."
        )
    return GatewayError("The server had an error while processing your request.")


class GuardedServer(Server):
    """aiohttp's ``Server`` that builds ``GuardedHandler`` protocols."""

    guard: Guard
    stats: GuardStats

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, **self._kwargs)


class GuardedHandler(RequestHandler):
    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager.guard
        self._stats = manager.stats
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None
        self._partial = False  # bytes of the awaited request's headers have arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._stats.open += 1
        server = self._manager
        if server is not None and len(server._connections) > self._guard.max_connections:
            self._stats.refused += 1
            busy = ServiceUnavailable("Too many connections to this server; retry shortly.")
            self._refuse(busy)
            return
        self._arm_headers()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stats.open -= 1
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = len(self._messages)
        super().data_received(data)
        if len(self._messages) > before:  # a request's headers are complete
            self._headers_done(self._messages[-1][1])
        elif self._body is not None:
            if self._body.is_eof():
                self._body_done()
        elif self._header_timer is None and self._current_request is None and data:
            self._arm_headers(partial=True)  # the first bytes of a next request
        elif data:
            self._partial = True

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        err = parse_error(exc, status)
        if err.status in (400, 431):
            # Logged without the exception: its text quotes the request line.
            self._stats.malformed += 1
            log.debug("refused a malformed request from %s (%s)", request.remote, err.status)
        else:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        resp = web.Response(status=err.status, body=err.body(), content_type="application/json")
        resp.force_close()
        return resp

    # -------------------------------------------------------------- deadlines

    def _arm_headers(self, partial: bool = False) -> None:
        self._partial = partial
        self._header_timer = self._loop.call_later(self._guard.header_timeout_s, self._headers_late)

    def _headers_done(self, payload: StreamReader) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if payload is not EMPTY_PAYLOAD and not payload.is_eof():
            self._body = payload
            self._body_timer = self._loop.call_later(self._guard.body_timeout_s, self._body_late)

    def _body_done(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_timer = self._body = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._current_request is not None or self._messages:
            return
        self._stats.header_timeouts += 1
        if not self._partial:  # an idle pooled connection: close it, as for keep-alive
            self.force_close()
            return
        limit = self._guard.header_timeout_s
        self._refuse(RequestTimeout(f"The request headers did not arrive within {limit:g}s."))

    def _body_late(self) -> None:
        body, self._body, self._body_timer = self._body, None, None
        if body is None or body.is_eof():
            return
        self._stats.body_timeouts += 1
        limit = self._guard.body_timeout_s
        body.set_exception(RequestTimeout(f"The request body did not arrive within {limit:g}s."))
        # Answer, then close; no lingering read of a body that is not coming.
        self._lingering_time = 0.0
        self.close()

    def _refuse(self, err: GatewayError) -> None:
        if self.transport is not None:
            self.transport.write(raw_response(err))
        self.force_close()

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None
        self._body = None


class GuardedRunner(web.AppRunner):
    """An ``AppRunner`` whose server speaks through ``GuardedHandler``."""

    def __init__(self, app: web.Application, guard: Guard, stats: GuardStats, **kw: Any) -> None:
        super().__init__(app, **kw)
        self._guard = guard
        self._stats = stats

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        # The same object, with the protocol factory swapped: what aiohttp's
        # ``Application._make_handler`` set up (handler, request factory,
        # handler args) is kept as it is.
        server.__class__ = GuardedServer
        assert isinstance(server, GuardedServer)
        server.guard, server.stats = self._guard, self._stats
        return server
