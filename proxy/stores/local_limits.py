"""The per-process fallback of the shared limits, for while Redis is down.

Same windows and slots as the Lua script in ``ratelimit.py``, on this
process's clock, with each limit's capacity divided by
``ratelimit.expected_instances`` (``capacity // n``, at least 1). With n set
to the number of Tollway processes (workers x instances) the fleet as a
whole still admits at most the limit in any rolling window *during* an
outage. What each process admitted in Redis before the outage is not seen by
the fallback (nor the reverse after it), so across the moment Redis goes
down or comes back a rolling window may hold up to twice the limit. A limit
smaller than n is still 1 per process, so up to n in all.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

from proxy.stores.windows import SLOTS, Limit, Verdict, Window


class _Slots:
    """One window: (slot, units) pairs oldest first, and their sum."""

    __slots__ = ("slots", "total")

    def __init__(self) -> None:
        self.slots: deque[list[int]] = deque()
        self.total = 0

    def prune(self, oldest: int) -> None:
        while self.slots and self.slots[0][0] < oldest:
            self.total -= self.slots.popleft()[1]

    def add(self, slot: int, units: int) -> None:
        if self.slots and self.slots[-1][0] == slot:
            self.slots[-1][1] += units
        else:
            self.slots.append([slot, units])
        self.total += units

    def retry_slot(self, need: int) -> int:
        for slot, units in self.slots:
            need -= units
            if need <= 0:
                return slot
        return self.slots[-1][0]


class LocalLimiter:
    def __init__(self, max_keys: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self._windows: OrderedDict[str, _Slots] = OrderedDict()
        self._held: dict[str, set[str]] = {}
        self._max = max_keys
        self._clock = clock

    def check(self, limits: Sequence[Limit], instances: int, *, commit: bool = True) -> Verdict:
        now = int(self._clock() * 1000)
        windows = [self._state(lim, max(1, lim.capacity // instances), now) for lim in limits]
        admitted = all(w.fits for w in windows)
        if admitted and commit:
            windows = [self._take(w, now) for w in windows]
        return Verdict(admitted, tuple(windows), now, shared=False)

    def release(self, limits: Sequence[Limit]) -> None:
        for lim in limits:
            holders = self._held.get(lim.key)
            if holders is not None:
                holders.discard(lim.member)
                if not holders:
                    del self._held[lim.key]

    def _state(self, lim: Limit, capacity: int, now: int) -> Window:
        if lim.concurrency:
            used = len(self._held.get(lim.key, ()))
            fits = used < capacity
            return Window(lim, capacity, fits, used, 0, 0 if fits else 1000)
        slot_ms = lim.window_ms // SLOTS
        cur = now // slot_ms
        win = self._windows.get(lim.key)
        if win is not None:
            win.prune(cur - SLOTS)
        total = win.total if win is not None else 0
        reset = (win.slots[0][0] + SLOTS + 1) * slot_ms - now if win and win.slots else 0
        if total + lim.cost <= capacity:
            return Window(lim, capacity, True, total, reset, 0)
        retry = -1
        if lim.cost <= capacity:
            assert win is not None
            retry = (win.retry_slot(total + lim.cost - capacity) + SLOTS + 1) * slot_ms - now
        return Window(lim, capacity, False, total, reset, retry)

    def _take(self, w: Window, now: int) -> Window:
        lim = w.limit
        if lim.concurrency:
            self._held.setdefault(lim.key, set()).add(lim.member)
            return Window(lim, w.capacity, True, w.used + 1, 0, 0)
        if lim.cost <= 0:
            return w
        slot_ms = lim.window_ms // SLOTS
        win = self._windows.get(lim.key)
        if win is None:
            win = self._windows[lim.key] = _Slots()
            if len(self._windows) > self._max:
                self._windows.popitem(last=False)
        self._windows.move_to_end(lim.key)
        win.add(now // slot_ms, lim.cost)
        reset = (win.slots[0][0] + SLOTS + 1) * slot_ms - now
        return Window(lim, w.capacity, True, win.total, reset, 0)
