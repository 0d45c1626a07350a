"""Tollway's event-loop lag over one measured window, from two scrapes of /metrics.

The probe (``proxy/web/loop_lag.py``, on when ``TOLLWAY_LOOP_LAG_MS`` is set)
exports a cumulative histogram of how late a 1 ms timer woke, and the worst
lateness of the last 5 s. The difference of two scrapes is the window's
histogram: its p99 is interpolated inside the bucket where it falls (the
buckets are 0.25 ms apart up to 1 ms, then 1.5, 2, 3, 5 ms..., so the 2 ms
target is read exactly at a bucket edge). The max is the gauge read right
after the window (so it spans the window and the warm-up before it).
"""

from __future__ import annotations

import math
import re
import urllib.request
from dataclasses import dataclass

NAME = "tollway_event_loop_lag_seconds"
_BUCKET = re.compile(rf'^{NAME}_bucket\{{le="([^"]+)"\}} (\S+)$', re.M)
_MAX = re.compile(r"^tollway_event_loop_lag_max_seconds (\S+)$", re.M)


@dataclass(frozen=True)
class Scrape:
    buckets: dict[float, float]  # upper bound (s) -> cumulative count
    worst_s: float | None


def scrape(port: int) -> Scrape | None:
    """None when the target exports no lag (the probe is off, or no Tollway)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return None
    buckets = {float(le): float(n) for le, n in _BUCKET.findall(text)}
    if not buckets:
        return None
    worst = _MAX.search(text)
    return Scrape(buckets, float(worst.group(1)) if worst else None)


def window(before: Scrape | None, after: Scrape | None) -> tuple[float | None, float | None]:
    """(p99 ms, max ms) of the lag between two scrapes."""
    if before is None or after is None:
        return None, None
    bounds = sorted(after.buckets)
    cum = [after.buckets[b] - before.buckets.get(b, 0.0) for b in bounds]
    worst = after.worst_s * 1000 if after.worst_s is not None else None
    if not cum or cum[-1] <= 0:
        return None, worst
    rank = 0.99 * cum[-1]
    lower, below = 0.0, 0.0
    for bound, n in zip(bounds, cum, strict=True):
        if n >= rank:
            if math.isinf(bound):
                return lower * 1000, worst  # beyond the last finite bucket: at least this
            inside = (rank - below) / (n - below) if n > below else 1.0
            return (lower + (bound - lower) * inside) * 1000, worst
        lower, below = bound, n
    return None, worst
