"""The long-stream scenario: one wave of N concurrent streams through a target.

Each stream is the fake provider's long answer (``--long-chunks`` content
chunks ``--long-gap-ms`` apart, 200 and 25 ms by default: a model writing
for about 5 s). The wave's streams start evenly over ``--long-ramp``
seconds; the serving process tree's CPU time is read before the first
connect and after the last stream ends, and its summed RSS sampled every
50 ms in between. So "CPU µs per event" includes each stream's set-up and
settle (a stream is a request), and "events/s" is the events delivered over
the wave's whole wall time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lag
import orjson
import procstat
from prompts import history


@dataclass
class LongPoint:
    streams: int
    ok: int
    errors: int
    first_error: str
    events: int
    events_per_s: float
    cpu_us_per_event: float | None
    ttfb_p50_ms: float | None
    ttfb_p99_ms: float | None
    gap_p99_ms: float | None
    gap_max_ms: float | None
    peak_rss_mb: float  # the serving process tree's (summed)
    peak_rss_root_mb: float  # the process run.py started, alone
    lag_p99_ms: float | None = None
    lag_max_ms: float | None = None


@dataclass
class LongRow:
    """Medians over repeats of one (N, target); errors summed."""

    streams: int
    target: str
    median: dict[str, Any]
    errors: int
    first_error: str
    repeats: list[LongPoint] = field(default_factory=list)

    def get(self, key: str) -> Any:
        return self.median.get(key)


def body() -> dict[str, Any]:
    return {
        "model": "bench-long",
        "messages": history(0.5),
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def measure_long(
    prefix: list[str],
    python: str,
    script: Path,
    port: int,
    n: int,
    args: argparse.Namespace,
    pid: int,
    api_key: str,
    scrape_lag: bool,
) -> LongPoint:
    """One wave; ``prefix`` pins the client (taskset), ``pid`` is the server."""
    nominal = args.long_chunks * args.long_gap_ms / 1000
    bound = args.long_ramp + max(30.0, 10 * nominal)
    argv = [
        *prefix,
        *(python, str(script), f"http://127.0.0.1:{port}/v1/chat/completions"),
        orjson.dumps(body()).decode(),
        *(f"--streams={n}", f"--ramp={args.long_ramp}", f"--timeout={bound}"),
        f"--api-key={api_key}",
    ]
    before = lag.scrape(port) if scrape_lag else None
    pids = procstat.tree(pid)
    rss = procstat.PeakRss(pid).start()
    cpu_from = procstat.cpu_us(pids)
    try:
        out = subprocess.run(argv, capture_output=True, timeout=bound + 30, check=True).stdout
    finally:
        cpu_to = procstat.cpu_us(pids)
        peak = rss.stop()
    lag_p99, lag_max = lag.window(before, lag.scrape(port) if scrape_lag else None)
    r = orjson.loads(out)
    cpu = None if cpu_from is None or cpu_to is None or not r["events"] else cpu_to - cpu_from
    return LongPoint(
        streams=n,
        ok=r["ok"],
        errors=r["errors"],
        first_error=r["first_error"],
        events=r["events"],
        events_per_s=r["events"] / r["elapsed"],
        cpu_us_per_event=None if cpu is None else cpu / r["events"],
        ttfb_p50_ms=r["ttfb_p50_ms"],
        ttfb_p99_ms=r["ttfb_p99_ms"],
        gap_p99_ms=r["gap_p99_ms"],
        gap_max_ms=r["gap_max_ms"],
        peak_rss_mb=peak / 2**20,
        peak_rss_root_mb=rss.peak_root / 2**20,
        lag_p99_ms=lag_p99,
        lag_max_ms=lag_max,
    )


_MEDIANS = (
    "events_per_s",
    "cpu_us_per_event",
    "ttfb_p50_ms",
    "ttfb_p99_ms",
    "gap_p99_ms",
    "gap_max_ms",
    "peak_rss_mb",
    "peak_rss_root_mb",
    "lag_p99_ms",
    "lag_max_ms",
)


def median_row(n: int, target: str, points: list[LongPoint]) -> LongRow:
    med: dict[str, Any] = {}
    for key in _MEDIANS:
        values = [getattr(p, key) for p in points if getattr(p, key) is not None]
        med[key] = statistics.median(values) if values else None
    return LongRow(
        streams=n,
        target=target,
        median=med,
        errors=sum(p.errors for p in points),
        first_error=next((p.first_error for p in points if p.first_error), ""),
        repeats=points,
    )


def table(rows: list[LongRow], fmt: Callable[[float | None, str], str]) -> str:
    lines = [
        "| streams | target | events/s | CPU µs/event | TTFB p50 ms | TTFB p99 ms "
        "| gap p99 ms | gap max ms | peak RSS MB tree (process) | loop lag p99 / max ms | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r.median
        lines.append(
            f"| {r.streams:,} | {r.target} | {m['events_per_s']:,.0f} "
            f"| {fmt(m['cpu_us_per_event'], '.1f')} | {fmt(m['ttfb_p50_ms'], '.1f')} "
            f"| {fmt(m['ttfb_p99_ms'], '.1f')} | {fmt(m['gap_p99_ms'], '.1f')} "
            f"| {fmt(m['gap_max_ms'], '.1f')} "
            f"| {m['peak_rss_mb']:.0f} ({m['peak_rss_root_mb']:.0f}) "
            f"| {fmt(m['lag_p99_ms'], '.2f')} / {fmt(m['lag_max_ms'], '.1f')} | {r.errors} |"
        )
    return "\n".join(lines)
