"""The providers' HTTP/1.1 client: keep-alive connections pooled per origin.

Replaces aiohttp's client for provider traffic, whose machinery (request
and response objects, traces, cookie jar, redirects, a timer per read) cost
about ten times what one exchange needs. A ``Pool`` holds, per (scheme,
host, port), the idle connections newest first (LIFO: the warm ones stay
warm and the rest age out after ``keepalive`` seconds), with no limit on
how many are open. ``post`` sends one request and returns once the status
and headers are in (``h1.Response``); redirects are never followed here.

A connection goes back to the pool only when its answer was read to the end
and neither side said ``Connection: close``. A request on a reused
connection that fails before any byte of an answer (the server closed it
while it was idle) is sent once more on a new one, as Go's transport does.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
from typing import NamedTuple
from urllib.parse import urlsplit

from proxy.config.model import Timeouts
from proxy.providers.h1 import Broken, ConnectFailed, Connection, Response, TimedOut

Origin = tuple[str, str, int]  # scheme, host, port


class Target(NamedTuple):
    origin: Origin
    start: str  # the request line and Host header


@functools.lru_cache(maxsize=1024)
def target(url: str) -> Target:
    """Where ``url`` goes; its request line (cached: a provider's URLs repeat)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.netloc.rpartition("@")[2]
    return Target((scheme, parts.hostname, port), f"POST {path} HTTP/1.1\r\nHost: {host}\r\n")


class Pool:
    """Connections to the providers; ``close`` closes every one of them."""

    def __init__(self, keepalive: float = 30.0, tls: ssl.SSLContext | None = None) -> None:
        self.keepalive = keepalive
        self._tls = tls
        self._idle: dict[Origin, list[Connection]] = {}
        self._open: set[Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing = False
        self._all_lost: asyncio.Future[None] | None = None

    async def post(
        self, url: str, payload: bytes, headers: dict[str, str], t: Timeouts
    ) -> Response:
        """Send, and wait for the status and headers. Raises ``h1.Failure``s."""
        where = target(url)
        lines = "".join([f"{k}: {v}\r\n" for k, v in headers.items()])
        n = len(headers)
        if lines.count("\n") != n or lines.count("\r") != n:
            raise ValueError("a header name or value holds a line break")
        keep = not any(
            k.lower() == "connection" and "close" in v.lower() for k, v in headers.items()
        )
        data = f"{where.start}Content-Length: {len(payload)}\r\n{lines}\r\n".encode() + payload
        loop = asyncio.get_running_loop()
        started = loop.time()
        conn = self._take(where.origin, started)
        while True:
            if conn is None:
                conn = await self._connect(where.origin, t, started, loop)
            response = Response(conn, t, loop, started, keep)
            conn.send(data, response)
            try:
                await response.head()
            except Broken as exc:
                if conn.reused and not exc.answered and not self._closing:
                    conn = None  # gone while idle: once more, on a new connection
                    continue
                raise
            except BaseException:
                response.close()
                raise
            return response

    def _take(self, origin: Origin, now: float) -> Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                continue
            if now - conn.idle_at >= self.keepalive:
                conn.close()
                continue
            return conn
        return None

    async def _connect(
        self, origin: Origin, t: Timeouts, started: float, loop: asyncio.AbstractEventLoop
    ) -> Connection:
        scheme, host, port = origin
        left = started + t.total - loop.time()
        which = "connect" if t.connect <= left else "total"
        tls = None
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        try:
            async with asyncio.timeout(min(t.connect, left)):
                transport, conn = await loop.create_connection(
                    lambda: Connection(self, origin),
                    host,
                    port,
                    ssl=tls,
                    server_hostname=host if tls is not None else None,
                )
        except TimeoutError:
            raise TimedOut(which) from None
        except OSError as exc:  # refused, unresolvable, TLS refused (ssl.SSLError)
            raise ConnectFailed(str(exc)) from None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._closing:
            transport.abort()
            raise ConnectFailed("the gateway is shutting down")
        self._open.add(conn)
        return conn

    # -- called by connections ------------------------------------------

    def give_back(self, conn: Connection) -> None:
        if self._closing:
            conn.close()
            return
        loop = asyncio.get_running_loop()
        conn.reused = True
        conn.idle_at = loop.time()
        idle = self._idle.get(conn.origin)
        if idle is None:
            self._idle[conn.origin] = [conn]
        else:
            idle.append(conn)
        if self._sweeper is None:
            self._sweeper = loop.call_at(conn.idle_at + self.keepalive, self._sweep)

    def lost(self, conn: Connection) -> None:
        self._open.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)
        if self._all_lost is not None and not self._open and not self._all_lost.done():
            self._all_lost.set_result(None)

    def _sweep(self) -> None:
        """Close the connections idle for ``keepalive``; come back for the rest."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        oldest = None
        for idle in self._idle.values():
            for conn in [c for c in idle if now - c.idle_at >= self.keepalive]:
                idle.remove(conn)
                conn.close()
            if idle and (oldest is None or idle[0].idle_at < oldest):
                oldest = idle[0].idle_at
        if oldest is not None:
            self._sweeper = loop.call_at(oldest + self.keepalive, self._sweep)

    async def close(self) -> None:
        """Close every connection, idle or answering, and wait until they are."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._idle.clear()
        if not self._open:
            return
        self._all_lost = asyncio.get_running_loop().create_future()
        for conn in list(self._open):
            conn.closed = True
            if conn.transport is not None:
                conn.transport.abort()
        async with asyncio.timeout(5):
            await self._all_lost
