"""One HTTP/1.1 exchange with a provider, on one pooled connection.

``Connection`` is the asyncio protocol of a keep-alive connection; the
``Response`` it is answering parses what arrives (llhttp, via ``httptools``)
and holds the body until it is read (``read``, ``readany``) or hands it on
as it arrives (``sink``, from the connection's own data callback: no task
wake-up per read). Neither knows about gateway errors: failures are the
``Failure`` kinds below, which ``providers.http`` turns into what a client
sees.

Timing is one loop timer per request, re-armed lazily (it fires, looks at
when bytes last came and re-arms for the rest of the gap): ``first_byte``
bounds the wait from the request sent to the answer's first body byte,
``idle`` each gap after it, ``total`` the whole request. Bytes the reader has
not taken yet (a slow client) are not the provider's silence.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable
from typing import Final, Protocol

import httptools
from multidict import CIMultiDict

from proxy.config.model import Timeouts

# Unread body bytes above which the provider's socket is no longer read.
HIGH_WATER: Final = 1 << 18


class Failure(Exception):
    """A request that went wrong below HTTP semantics."""


class ConnectFailed(Failure):
    """No connection could be made (refused, unresolvable, TLS refused)."""


class Broken(Failure):
    """The connection closed, reset or spoke something that is not HTTP.
    ``answered``: whether any byte of the response had arrived."""

    def __init__(self, message: str, answered: bool) -> None:
        super().__init__(message)
        self.answered = answered


class Undecodable(Failure):
    """A body in a ``Content-Encoding`` the client cannot decode."""


class TimedOut(Failure):
    """``which`` bound ran out: connect, first_byte, idle or total."""

    def __init__(self, which: str) -> None:
        super().__init__(which)
        self.which = which


class Owner(Protocol):
    """Where a connection goes when it is free, and says it is gone (the pool)."""

    def give_back(self, conn: Connection) -> None: ...

    def lost(self, conn: Connection) -> None: ...


class Connection(asyncio.Protocol):
    """A keep-alive connection to one origin; answers one request at a time."""

    __slots__ = ("closed", "idle_at", "origin", "pool", "response", "reused", "transport")

    def __init__(self, pool: Owner, origin: tuple[str, str, int]) -> None:
        self.pool, self.origin = pool, origin
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.reused = False  # it answered a request before this one
        self.closed = False
        self.idle_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, response: Response) -> None:
        self.response = response
        self.transport.write(data)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # nothing was asked: a server that is not HTTP/1.1 keep-alive
            self.close()
            return
        response.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response, self.response = self.response, None
        if response is not None:
            response.lost()
        self.pool.lost(self)

    def finished(self, keep: bool) -> None:
        """The response was read to its end: back to the pool, or closed."""
        self.response = None
        if keep and not self.closed:
            self.pool.give_back(self)
        else:
            self.close()

    def close(self) -> None:
        self.response = None
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()


class Response:
    """One response: status and headers, then the body. Made by the pool."""

    __slots__ = (
        "_begun",
        "_conn",
        "_decoder",
        "_done",
        "_error",
        "_head",
        "_interim",
        "_keep",
        "_last",
        "_loop",
        "_parser",
        "_parts",
        "_paused",
        "_raw",
        "_sent_at",
        "_size",
        "_t",
        "_timer",
        "_total_at",
        "_until_close",
        "_waiter",
        "answered",
        "sink",
        "sink_end",
        "status",
    )

    def __init__(
        self,
        conn: Connection,
        t: Timeouts,
        loop: asyncio.AbstractEventLoop,
        started: float,
        keep: bool,
    ) -> None:
        self._conn: Connection | None = conn
        self._t, self._loop = t, loop
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.status = 0
        self._raw: list[tuple[bytes, bytes]] = []
        self._parts: list[bytes] = []
        self._size = 0
        self._head = self._done = self._begun = self._interim = False
        self._paused = self._until_close = False
        self._keep = keep  # the request did not say Connection: close
        self._error: Failure | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._decoder: _Decoder | None = None
        self.answered = False  # a response byte has arrived
        # While set: each socket read's body bytes go to ``sink`` instead of
        # the buffer; ``sink_end`` is called once the body ends or fails.
        self.sink: Callable[[bytes], None] | None = None
        self.sink_end: Callable[[], None] | None = None
        self._sent_at = self._last = now = loop.time()
        self._total_at = started + t.total
        self._timer: asyncio.TimerHandle | None = loop.call_at(
            min(now + t.first_byte, self._total_at), self._tick
        )

    # -- what the reader sees -------------------------------------------

    @property
    def headers(self) -> CIMultiDict[str]:
        return CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in self._raw)

    @property
    def pushable(self) -> bool:
        """Whether the body can be handed on as it arrives (``sink``)."""
        return not (self._parts or self._done or self._error is not None)

    async def head(self) -> None:
        """Wait for the status and headers."""
        while not self._head:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def read(self) -> bytes:
        """The whole body."""
        while not self._done:
            if self._error is not None:
                raise self._error
            self._resume()
            await self._wait()
        parts = self._parts
        self._parts, self._size = [], 0
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def readany(self) -> bytes:
        """The body bytes that have arrived (waiting for some); b"" at the end."""
        while True:
            parts = self._parts
            if parts:
                self._parts, self._size = [], 0
                if self._paused and not self._done:
                    self._resume()
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            self._resume()
            await self._wait()

    def pause(self) -> None:
        """Stop reading the provider's socket until the next ``read``."""
        conn = self._conn
        if not self._paused and conn is not None and conn.transport is not None:
            self._paused = True
            conn.transport.pause_reading()

    def close(self) -> None:
        """Done with it: a response not read to its end closes its connection."""
        self.sink = self.sink_end = None
        if not self._done and self._error is None:
            self._error = Broken("closed before its end", self.answered)
        self._parser = None  # the cycle, as in ``feed``
        self._stop_timer()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # -- fed by the connection ----------------------------------------------

    def feed(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:  # whole or closed: its connection no longer feeds it
            return
        self.answered = True
        begun = self._begun
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            why = exc.__context__  # what a callback of ours raised, if it was that
            if isinstance(why, _Refused):
                self._fail(Undecodable(str(why)))
                return
            if isinstance(why, _Garbled):
                self._fail(Broken("sent a body its Content-Encoding does not decode", True))
                return
            if self._done:  # bytes after a whole answer: the connection is not reusable
                self._keep = False
            else:
                self._fail(Broken("sent something that is not HTTP/1.1", True))
                return
        if self._error is not None:  # failed in a callback (``_end``): already told
            return
        self._last = self._loop.time()
        if self._done:
            # The parser holds this response as its callbacks' object: a
            # cycle only the collector would free (~10 objects a request,
            # and its collections are loop stalls of tens of ms under load).
            self._parser = None
            self._stop_timer()
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.finished(self._keep)
        elif self._begun and not begun:
            self._rearm()  # the answer has begun: from now on the timer bounds the gaps
        if self._parts:
            if self.sink is not None:
                parts = self._parts
                self._parts, self._size = [], 0
                self.sink(parts[0] if len(parts) == 1 else b"".join(parts))
            elif self._size > HIGH_WATER:
                self.pause()
        if self._done and self.sink_end is not None:
            self.sink_end()
        self._wake()

    def lost(self) -> None:
        self._conn = None
        if self._done or self._error is not None:
            return
        if self._head and self._until_close:
            self._end()  # a body delimited by the close: it is whole
            self._wake()
            if self.sink_end is not None:
                self.sink_end()
        else:
            self._fail(Broken("closed the connection", self.answered))

    # httptools' callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # it is the caller
        status = parser.get_status_code()
        if status < 200:  # 1xx: an interim answer; the real one follows
            self._raw.clear()
            self._interim = True
            return
        self.status = status
        self._keep = self._keep and parser.should_keep_alive()
        chunked = length = False
        for k, v in self._raw:
            k = k.lower()
            if k == b"content-length":
                length = True
            elif k == b"transfer-encoding":
                chunked = b"chunked" in v.lower()
            elif k == b"content-encoding":
                coding = v.strip().lower()
                if coding in (b"gzip", b"x-gzip", b"deflate"):
                    self._decoder = _Decoder(coding)
                elif coding not in (b"", b"identity"):
                    raise _Refused(coding.decode("latin-1"))
        self._until_close = not (length or chunked or status in (204, 304))
        self._head = True

    def on_body(self, body: bytes) -> None:
        if self._decoder is not None:
            try:
                body = self._decoder.feed(body)
            except zlib.error:
                raise _Garbled from None
            if not body:
                return
        self._begun = True
        self._parts.append(body)
        self._size += len(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._end()

    # -- internals ------------------------------------------------------

    def _end(self) -> None:
        if self._decoder is not None:
            try:
                rest = self._decoder.flush()
            except zlib.error:
                self._fail(Broken("sent a body its Content-Encoding does not decode", True))
                return
            if rest:
                self._parts.append(rest)
                self._size += len(rest)
        self._done = self._begun = True
        self._stop_timer()

    async def _wait(self) -> None:
        self._waiter = waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self._last = self._loop.time()  # the silence counts from now
            conn = self._conn
            if conn is not None and conn.transport is not None:
                conn.transport.resume_reading()

    def _fail(self, error: Failure) -> None:
        if self._error is not None or self._done:
            return
        self._error = error
        self._stop_timer()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self._wake()
        if self.sink_end is not None:
            self.sink_end()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _rearm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(min(self._last + self._t.idle, self._total_at), self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._done or self._error is not None:
            return
        now = self._loop.time()
        if now >= self._total_at:
            self._fail(TimedOut("total"))
            return
        if not self._begun:
            due = self._sent_at + self._t.first_byte
            if now >= due:
                self._fail(TimedOut("first_byte"))
                return
        elif self._parts or self._paused:  # bytes wait for the reader: not silence
            self._last = now
            due = now + self._t.idle
        else:
            due = self._last + self._t.idle
            if now >= due:
                self._fail(TimedOut("idle"))
                return
        self._timer = self._loop.call_at(min(due, self._total_at), self._tick)


class _Refused(Exception):
    """Raised from a parser callback: the answer's encoding is not ours to read."""


class _Garbled(Exception):
    """Raised from a parser callback: the body does not decode."""


class _Decoder:
    """gzip or deflate (zlib-wrapped or raw, as servers differ) to bytes."""

    __slots__ = ("_coding", "_z")

    def __init__(self, coding: bytes) -> None:
        self._coding = coding
        self._z: zlib._Decompress | None = (
            None if coding == b"deflate" else zlib.decompressobj(16 + zlib.MAX_WBITS)
        )

    def feed(self, data: bytes) -> bytes:
        if self._z is None:
            wrapped = (
                len(data) >= 2 and (data[0] & 0x0F) == 8 and (data[0] << 8 | data[1]) % 31 == 0
            )
            self._z = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        return self._z.decompress(data)

    def flush(self) -> bytes:
        return self._z.flush() if self._z is not None else b""
