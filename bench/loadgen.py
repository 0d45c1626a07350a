"""Closed-loop HTTP/1.1 load generator for one benchmark point.

usage: loadgen.py URL BODY_JSON --concurrency C --duration S [--max-requests N]
                  [--warmup S] [--start-at UNIX_TIME] [--stream] [--rate R]

Each of C keep-alive connections sends one POST, waits for the whole answer,
then sends the next, until the duration ends or N requests have started
(bounded in time AND count; a hard deadline aborts anything still hanging).
It prints one JSON object: completed requests and errors in the measured
window, and latency and time-to-first-byte samples in microseconds.

``--rate R`` makes it open loop: request k is due at ``k / R`` seconds after
the start, whether or not earlier ones have finished (as users' requests
arrive), and goes out on the first of the C connections free at or after its
due time; its latency and TTFB count from the due time, so a request that
waited for a free connection (a stalled server) shows it. Below the server's
capacity, R and not the server's speed sets the load: a point at half the
capacity measures the server unsaturated.

Why not aiohttp's client: it spends ~100 us of CPU per request, so on two
cores it, not the proxy, would set the ceiling. This is a bare
``asyncio.Protocol`` that sends pre-encoded bytes and parses just enough of
the response (Content-Length or chunked) to know when it ends, several times
cheaper per request. It is used unchanged for every target, and refuses any
host but 127.0.0.1: a load test must never leave the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import orjson

DONE = b"data: [DONE]\n\n"


@dataclass
class Stats:
    measure_from: float  # perf_counter() at which the measured window opens
    stop_at: float  # no request starts after this
    max_requests: int
    started: int = 0
    ok: int = 0
    errors: int = 0
    first_error: str = ""
    latency_us: list[int] = field(default_factory=list)
    ttfb_us: list[int] = field(default_factory=list)
    rate: float = 0.0  # open loop: requests per second (0: closed loop)
    origin: float = 0.0  # perf_counter() at which request 0 is due (open loop)

    def may_start(self) -> bool:
        return self.started < self.max_requests and self.next_due() < self.stop_at

    def next_due(self) -> float:
        """When the next request may go out: now (closed loop) or its due time."""
        if not self.rate:
            return time.perf_counter()
        return self.origin + self.started / self.rate

    def error(self, t0: float, why: str) -> None:
        if t0 >= self.measure_from:
            self.errors += 1
            self.first_error = self.first_error or why


class Conn(asyncio.Protocol):
    """One keep-alive connection sending ``request`` back to back.

    Completion is driven from ``data_received``: the next request goes out in
    the same callback that finished the previous one, with no task switch.
    """

    def __init__(self, request: bytes, stream: bool, stats: Stats) -> None:
        self.request = request
        self.stream = stream
        self.stats = stats
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if not self.stats.may_start():
            self.transport.close()
            return
        due = self.stats.next_due()
        self.stats.started += 1
        wait = due - time.perf_counter()
        if wait > 0:  # open loop, ahead of schedule: send it when it is due
            asyncio.get_running_loop().call_later(wait, self._fire, due)
        else:  # closed loop, or due already (it waited for this connection)
            self._fire(due)

    def _fire(self, t0: float) -> None:
        """Send the request; its latency counts from ``t0``."""
        assert self.transport is not None
        if self.transport.is_closing():
            return
        self.buf = bytearray()
        self.head: int | None = None  # where the body starts, once headers are in
        self.body = bytearray()
        self.pos = 0  # chunked: parse position in buf
        self.ttfb = 0.0
        self.busy = True
        self.t0 = t0
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            if (self.head is None and not self._parse_head()) or not self._parse_body():
                return
        except ValueError as exc:  # a malformed response: count it, drop the connection
            self.stats.error(self.t0, f"bad response: {exc}")
            self.busy = False
            assert self.transport is not None
            self.transport.close()
            return
        self.busy = False
        self._finish(time.perf_counter())
        self._send()

    def _parse_head(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self.buf[:end]).lower().split(b"\r\n")
        self.status = int(lines[0][9:12])
        self.chunked, self.length = False, -1
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name == b"content-length":
                self.length = int(value)
            elif name == b"transfer-encoding":
                self.chunked = b"chunked" in value
        self.head = end + 4
        self.pos = end + 4
        return True

    def _parse_body(self) -> bool:
        """True once the whole body is in; records TTFB on the first SSE data."""
        assert self.head is not None
        start = self.head
        if not self.chunked:
            if self.length < 0:
                raise ValueError("response has neither Content-Length nor chunked encoding")
            if len(self.buf) - start < self.length:
                return False
            self.body = self.buf[start : start + self.length]
            return True
        while True:
            eol = self.buf.find(b"\r\n", self.pos)
            if eol < 0:
                return False
            size = int(self.buf[self.pos : eol].split(b";")[0], 16)
            if len(self.buf) < eol + 2 + size + 2:
                return False
            if size == 0:
                return True
            self.body += self.buf[eol + 2 : eol + 2 + size]
            self.pos = eol + 2 + size + 2
            if not self.ttfb and b"data:" in self.body:
                self.ttfb = time.perf_counter()

    def _finish(self, t1: float) -> None:
        st, t0, status = self.stats, self.t0, self.status
        if status != 200:
            st.error(t0, f"HTTP {status}: {bytes(self.body[:200])!r}")
        elif self.stream and not self.body.endswith(DONE):
            st.error(t0, f"stream did not end with [DONE]: {bytes(self.body[-200:])!r}")
        elif not self.stream and not self.body.startswith(b"{"):
            st.error(t0, f"not a JSON body: {bytes(self.body[:200])!r}")
        elif t0 >= st.measure_from:
            # A request finishing after the window still gives a latency sample,
            # but only in-window completions count towards throughput.
            st.ok += t1 <= st.stop_at
            st.latency_us.append(round((t1 - t0) * 1e6))
            if self.stream:
                st.ttfb_us.append(round(((self.ttfb or t1) - t0) * 1e6))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.busy:
            self.stats.error(self.t0, f"connection lost mid-request: {exc!r}")
        if not self.closed.done():
            self.closed.set_result(None)


async def _slot(host: str, port: int, request: bytes, stream: bool, stats: Stats) -> None:
    """Keep one connection busy; reconnect (after a pause) if the server drops it."""
    loop = asyncio.get_running_loop()
    while stats.may_start():
        try:
            transport, conn = await loop.create_connection(
                lambda: Conn(request, stream, stats), host, port
            )
        except OSError as exc:
            stats.error(time.perf_counter(), f"connect failed: {exc!r}")
            await asyncio.sleep(0.05)
            continue
        try:
            await conn.closed
        finally:
            transport.close()
        if stats.may_start():  # dropped early: do not hammer a failing server
            await asyncio.sleep(0.01)


def build_request(host: str, port: int, path: str, body: bytes, api_key: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Content-Type: application/json\r\nAccept: */*\r\n"
        f"Authorization: Bearer {api_key}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def run_point(
    url: str,
    body: bytes,
    *,
    concurrency: int,
    duration: float,
    warmup: float = 0.5,
    max_requests: int = 10_000_000,
    start_at: float = 0.0,
    stream: bool = False,
    api_key: str = "sk-bench",
    rate: float = 0.0,
) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    if host != "127.0.0.1":
        raise SystemExit(f"loadgen: refusing {host!r}: benchmarks run on 127.0.0.1 only")
    if start_at:  # several generator processes start their windows together
        await asyncio.sleep(max(0.0, start_at - time.time()))
    now = time.perf_counter()
    stats = Stats(now + warmup, now + warmup + duration, max_requests, rate=rate, origin=now)
    request = build_request(host, port, parts.path, body, api_key)
    slots = [_slot(host, port, request, stream, stats) for _ in range(concurrency)]
    try:
        # Hard bound: a hung response must not hold the benchmark hostage.
        await asyncio.wait_for(asyncio.gather(*slots), timeout=warmup + duration + 10)
    except TimeoutError:
        stats.errors += 1
        stats.first_error = stats.first_error or "requests still hanging 10 s after the end"
    elapsed = min(time.perf_counter(), stats.stop_at) - stats.measure_from
    return {
        "ok": stats.ok,
        "errors": stats.errors,
        "first_error": stats.first_error,
        "elapsed": elapsed,
        "latency_us": stats.latency_us,
        "ttfb_us": stats.ttfb_us,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", help="http://127.0.0.1:PORT/path")
    p.add_argument("body", help="request body (JSON text)")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds first")
    p.add_argument("--max-requests", type=int, default=10_000_000)
    p.add_argument("--start-at", type=float, default=0.0, help="UNIX time to begin")
    p.add_argument("--stream", action="store_true", help="expect an SSE answer")
    p.add_argument("--api-key", default="sk-bench", help="sent as the Bearer token")
    p.add_argument("--rate", type=float, default=0.0, help="open loop: requests/s on C connections")
    a = p.parse_args()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    result = asyncio.run(
        run_point(
            a.url,
            a.body.encode(),
            concurrency=a.concurrency,
            duration=a.duration,
            warmup=a.warmup,
            max_requests=a.max_requests,
            start_at=a.start_at,
            stream=a.stream,
            api_key=a.api_key,
            rate=a.rate,
        )
    )
    # One os.write per piece: after uvloop has run, a write of more than the
    # pipe's 64 KB returns short (seen here), and sys.stdout's buffer then
    # dropped the rest silently: a fast point's latencies cut mid-JSON.
    out = memoryview(orjson.dumps(result))
    while out:
        out = out[os.write(sys.stdout.fileno(), out) :]


if __name__ == "__main__":
    main()
