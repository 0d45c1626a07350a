"""Event-loop lag: how late a short timer wakes on this worker's loop.

Whatever holds the loop (tiktoken over a large prompt, a big JSON parse, any
synchronous call) delays every other request and open stream of the worker by
as long, and no request-latency histogram shows it where it happens. A probe
sleeps ``interval`` again and again and records how much later than asked it
woke up (clock: ``perf_counter``):

- ``tollway_event_loop_lag_seconds``, a histogram (fine buckets up to 3 ms,
  where "the loop is fine" ends);
- ``tollway_event_loop_lag_max_seconds``, the worst lateness of the last
  ``WINDOW_S`` seconds (the instance's worst when several workers share).

Off unless ``TOLLWAY_LOOP_LAG_MS`` is set to the interval in milliseconds
(``1`` in the benchmark): an idle worker woken every millisecond spends a few
percent of a core on wake-ups alone, which nobody should pay by default.

The probe itself (``LoopLag``, ``interval_from_env``) needs no gateway: the
benchmark's yardsticks (``bench/floor_proxy.py``) run the same timer and
export the same series (rendered by ``core.prometheus``, as the gateway's
are), so their lag is read the same way in the same run. Only
``loop_lag_ctx`` reaches into the app's state, and imports it when called.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections import deque
from collections.abc import AsyncIterator

from aiohttp import web
from aioprometheus import Gauge, Histogram, Registry
from aioprometheus import histogram as hist

ENV = "TOLLWAY_LOOP_LAG_MS"
NAME = "tollway_event_loop_lag_seconds"
MAX_NAME = "tollway_event_loop_lag_max_seconds"
BUCKETS = (
    *(0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075),
    *(0.01, 0.025, 0.05, 0.1, 0.25, 1.0, math.inf),
)
WINDOW_S = 5


class LoopLag:
    """The probe's numbers, kept in collectors of ``registry`` as they come:
    one histogram observation per wake-up (~1 µs), the max gauge touched only
    when the worst value changes."""

    def __init__(self, registry: Registry, interval: float) -> None:
        self.interval = interval
        self.series = hist.Histogram(*BUCKETS)
        doc = "How late a periodic timer woke on the event loop (what every request waited)."
        Histogram(NAME, doc, registry=registry, buckets=BUCKETS).set_value({}, self.series)
        self.worst = Gauge(
            MAX_NAME, f"Largest event-loop lag in the last {WINDOW_S} s.", registry=registry
        )
        self.worst.set({}, 0.0)
        self._slots: deque[list[float]] = deque(maxlen=WINDOW_S)  # [second, max lag]
        self._shown = 0.0

    def record(self, late: float, now: float) -> None:
        self.series.observe(late)
        second = float(int(now))
        if not self._slots or self._slots[-1][0] != second:
            self._slots.append([second, late])
            # A second aged out: the worst may have left the window.
            self._show(max(lag for s, lag in self._slots if s > second - WINDOW_S))
        elif late > self._slots[-1][1]:
            self._slots[-1][1] = late
            if late > self._shown:
                self._show(late)

    def _show(self, value: float) -> None:
        self._shown = value
        self.worst.set({}, value)

    async def run(self) -> None:
        clock, interval = time.perf_counter, self.interval
        while True:
            due = clock() + interval
            await asyncio.sleep(interval)
            now = clock()
            self.record(max(0.0, now - due), now)


def interval_from_env() -> float | None:
    """Seconds between wake-ups, or None (off) when the variable is unset or 0."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        ms = float(raw)
    except ValueError as exc:
        raise ValueError(f"{ENV}={raw!r}: expected milliseconds, e.g. 1") from exc
    return ms / 1000 if ms > 0 else None


async def loop_lag_ctx(app: web.Application) -> AsyncIterator[None]:
    # Here, not at the top: the gateway's app state would load the whole
    # gateway into a yardstick that only wants the probe.
    from proxy.web.keys import METRICS, TASKS

    interval = interval_from_env()
    if interval is None:
        yield
        return
    probe = LoopLag(app[METRICS].registry, interval)
    task = app[TASKS].spawn(probe.run(), name="loop-lag")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
