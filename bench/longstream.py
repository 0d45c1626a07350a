"""Long-stream load client: N concurrent SSE streams, each event timed on arrival.

usage: longstream.py URL BODY_JSON --streams N [--ramp S] [--timeout S] [--api-key K]

Opens N connections, started evenly over ``--ramp`` seconds (a burst of
1,000 connects in one millisecond measures the accept queue, not the
proxy), sends one streaming request on each, and reads the answer to its
end. Each SSE event's arrival is stamped (events that arrive in the same
read share a stamp). Bounded in count (N streams, one request each) and in
time (``--timeout`` aborts whatever is still open, counted as errors). It
prints one JSON object: streams ok and failed, events, the wall time from
the first connect to the last event, time-to-first-event percentiles and the
inter-event gap percentiles (all events of all streams). 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import orjson
from loadgen import build_request
from procstat import raise_nofile

DONE = b"data: [DONE]\n\n"


@dataclass
class Totals:
    ok: int = 0
    errors: int = 0
    first_error: str = ""
    events: int = 0
    first_at: float = 0.0
    last_at: float = 0.0
    ttfb_us: list[int] = field(default_factory=list)
    gaps_us: list[int] = field(default_factory=list)

    def error(self, why: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or why


class Stream(asyncio.Protocol):
    """One connection, one streaming request: de-chunks the body as it comes
    and counts SSE events (blank-line terminated) at their arrival."""

    def __init__(self, request: bytes, totals: Totals) -> None:
        self.request, self.totals = request, totals
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.raw = bytearray()
        self.head = False
        self.status = 0
        self.tail = b""  # the last bytes of de-chunked body, to find "\n\n" across reads
        self.ended = False
        self.last_event = 0.0
        self.events = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t0 = time.perf_counter()
        cast(asyncio.Transport, transport).write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.raw += data
        if not self.head:
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(self.raw[9:12])
            chunked = b"chunked" in bytes(self.raw[:end]).lower()
            del self.raw[: end + 4]
            self.head = True
            if not chunked:  # an error answer, not a stream: _one counts it
                self.done.set_result(None)
                return
        body = self._dechunk()
        if body:
            self._events(body, now)

    def _dechunk(self) -> bytes:
        out = bytearray()
        while True:
            eol = self.raw.find(b"\r\n")
            if eol < 0:
                break
            size = int(self.raw[:eol].split(b";")[0], 16)
            if len(self.raw) < eol + 2 + size + 2:
                break
            out += self.raw[eol + 2 : eol + 2 + size]
            del self.raw[: eol + 2 + size + 2]
            if size == 0:
                self.ended = True
                if not self.done.done():
                    self.done.set_result(None)
                break
        return bytes(out)

    def _events(self, body: bytes, now: float) -> None:
        joined = self.tail + body
        n = joined.count(b"\n\n") - self.tail.count(b"\n\n")
        self.tail = joined[-len(DONE) :]
        if n <= 0:
            return
        t = self.totals
        if not self.events:
            t.ttfb_us.append(round((now - self.t0) * 1e6))
        else:
            t.gaps_us.append(round((now - self.last_event) * 1e6))
            t.gaps_us.extend([0] * (n - 1))
        if not self.events and n > 1:
            t.gaps_us.extend([0] * (n - 1))
        self.events += n
        self.last_event = now
        t.events += n
        t.last_at = max(t.last_at, now)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _one(host: str, port: int, request: bytes, totals: Totals, delay: float) -> None:
    await asyncio.sleep(delay)
    loop = asyncio.get_running_loop()
    try:
        transport, s = await loop.create_connection(lambda: Stream(request, totals), host, port)
    except OSError as exc:
        totals.error(f"connect failed: {exc!r}")
        return
    try:
        await s.done
    finally:
        transport.close()
    if s.status != 200:
        totals.error(f"HTTP {s.status}")
    elif not (s.ended and s.tail.endswith(DONE)):
        totals.error(f"stream cut after {s.events} events: {s.tail!r}")
    else:
        totals.ok += 1


def _pct(values: list[int], q: float) -> float | None:
    if not values:
        return None
    values.sort()
    return values[min(len(values) - 1, int(q * len(values)))] / 1000


async def run_wave(
    url: str, body: bytes, streams: int, ramp: float, bound_s: float, api_key: str
) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    if host != "127.0.0.1":
        raise SystemExit(f"longstream: refusing {host!r}: benchmarks run on 127.0.0.1 only")
    request = build_request(host, port, parts.path, body, api_key)
    totals = Totals(first_at=time.perf_counter())
    wave = [_one(host, port, request, totals, ramp * i / streams) for i in range(streams)]
    try:
        await asyncio.wait_for(asyncio.gather(*wave), timeout=bound_s)
    except TimeoutError:
        hanging = streams - totals.ok - totals.errors
        totals.error(f"{hanging} stream(s) still open after {bound_s:g} s")
        totals.errors += hanging - 1
    return {
        "ok": totals.ok,
        "errors": totals.errors,
        "first_error": totals.first_error,
        "events": totals.events,
        "elapsed": max(1e-9, (totals.last_at or time.perf_counter()) - totals.first_at),
        "ttfb_p50_ms": _pct(totals.ttfb_us, 0.5),
        "ttfb_p99_ms": _pct(totals.ttfb_us, 0.99),
        "gap_p50_ms": _pct(totals.gaps_us, 0.5),
        "gap_p99_ms": _pct(totals.gaps_us, 0.99),
        "gap_max_ms": _pct(totals.gaps_us, 1.0),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("body")
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--ramp", type=float, default=1.0, help="seconds over which streams start")
    p.add_argument("--timeout", type=float, default=120.0, help="hard bound on the wave")
    p.add_argument("--api-key", default="sk-bench")
    a = p.parse_args()
    raise_nofile(a.streams + 256)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    wave = run_wave(a.url, a.body.encode(), a.streams, a.ramp, a.timeout, a.api_key)
    sys.stdout.buffer.write(orjson.dumps(asyncio.run(wave)))


if __name__ == "__main__":
    main()
