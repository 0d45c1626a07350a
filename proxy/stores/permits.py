"""Leases of rate-limit permits: the key's windows without a Redis round
trip per request, as quota leases come from Postgres.

When a request needs Redis anyway, the script (``ratelimit.py``) also leases
up to ``size`` more units of each window to this worker: they are **counted
in the window when leased**, in the current slot, and at most 1/16 of what
is left beyond the request, so near the limit leases shrink to nothing and
every request is a single permit checked in Redis. The worker then admits
from its lease without Redis, but **only while that slot is current** (by
Redis's clock: a lease ends at the local instant it was asked for plus the
slot's remaining time at Redis, never later than the slot itself). Each
request so admitted happened inside the slot it is counted in, which is
all the sliding log's proof needs: **no rolling window holds more than its
capacity**, across workers and instances, as without leases.

Unused permits go back to their slot with the next script call for that key
(they are counted until then, which can only refuse, never over-admit); a
worker that stops using a key leaves at most the unused part of its last
lease counted until that slot leaves the window (≤ 1/16 of what was left),
as does a lease replaced across a slot boundary by concurrent refills
(refills within one slot merge).
The lease size doubles while leases run out within their slot (up to
``BASE_SIZE`` requests, or that many requests' worth of tokens) and halves
when they do not. Beyond ``BASE_SIZE`` (up to ``MAX_SIZE``) it grows only
while the window has room for ``FAR_LEASES * 16`` leases of the new size
(so the 1/16 rule never trims it, and what a worker's leases can leave
counted unused, a lease and the rest of the one before, is under 1/32 of
what was left): a busy key far from its limit (a large
window, many requests a slot) goes to Redis once every few hundred
requests instead of every 64, and a key nearer its limit leases exactly as
before.

**Top-ups.** When a request admitted from a lease leaves it below half its
size, and the window was far from its capacity at the last lease
(``FAR_LEASES`` full leases' worth beyond the 1/16 rule), the next lease is
asked for by a background task (the same script, for no request: cost 0),
so under load the requests in flight do not all find the lease empty and
wait for Redis together. Its units are counted when leased, like any
lease's, so the bound above is unchanged; near the limit nothing is leased
ahead and every request goes to Redis as before. A top-up granted in the
lease's slot adds to it, also when it lands after the lease's local end
(the lease then lasts to the slot end that call proves, and the rest of
both goes back in one piece); one landing in the next slot replaces it (the
old lease's rest stays counted until its slot leaves the window, as with
concurrent refills). A lease that falls below half within its slot counts
as one that ran out: the next one asked for is twice the size. A request
that finds the lease short meanwhile refills it itself, as without top-ups.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proxy.core.tasks import TaskGroup
from proxy.stores.lease_pace import top_up_soon
from proxy.stores.ratelimit import LeaseAsk, RateLimiter
from proxy.stores.windows import SLOTS, Limit, Verdict, Window

BASE_SIZE = 64  # requests' worth a lease may grow to anywhere (the 1/16 rule bounds it)
MAX_SIZE = 1024  # ... and beyond that, only far from the window's capacity (``_grown``)
# Leases asked for ahead of need only while the window has room for this
# many full leases beyond the 1/16 rule (so each top-up is granted in full).
FAR_LEASES = 4

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Lease:
    slot: int  # Redis slot index the units are counted in
    ends: float  # local monotonic time after which the slot may have passed
    left: int
    used: int  # the window's units after the lease was taken (it included)
    reset_ms: int  # at lease time
    redis_ms: int  # Redis's clock at lease time
    taken_at: float  # local monotonic time the lease was asked for
    size: int  # requests' worth asked for the next lease
    topping: bool = False  # a background top-up is under way

    def covers(self, cost: int, now: float) -> bool:
        return now < self.ends and self.left >= cost


class PermitLeases:
    def __init__(
        self,
        limiter: RateLimiter,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        self.limiter = limiter
        self._clock = clock
        self._leases: OrderedDict[str, _Lease] = OrderedDict()
        self._max = max_keys
        self.local_admits = 0  # requests admitted from a lease, without Redis
        self.top_ups = 0  # leases asked for in the background
        self._topping = TaskGroup()

    def take(self, limits: Sequence[Limit]) -> Verdict | None:
        """``check`` of a request with one window its lease covers (the
        common case): no coroutine, no dicts. None: ``check`` decides."""
        if len(limits) != 1:
            return None
        lim = limits[0]
        got = self.take_one(lim)
        if got is None:
            return None
        used, reset_ms, now_ms = got
        return Verdict(True, (Window(lim, lim.capacity, True, used, reset_ms, 0),), now_ms, True)

    def take_one(self, lim: Limit) -> tuple[int, int, int] | None:
        """``take`` of one window, without building its verdict (the admit
        stage's fast path formats the headers from the numbers): the units
        counted in the window as this worker knows it, the ms until its
        reset (``_window``'s), Redis's clock; None: ``check`` decides."""
        lease = self._leases.get(lim.key)
        now = self._clock()
        if lease is None or not (now < lease.ends and lease.left >= lim.cost):
            return None
        self.local_admits += 1
        lease.left -= lim.cost
        if lease.left * 2 < lease.size * lim.cost and not lease.topping:
            self._top_up_soon(lim, lease)
        # ``_window``'s, its ``int()`` a ``__trunc__`` and its ``max`` spelled
        # out: per request, and a type call costs ~0.9k instructions more
        elapsed_ms = ((now - lease.taken_at) * 1000).__trunc__()
        reset = lease.reset_ms
        if reset:
            reset -= elapsed_ms
            if reset < 1:
                reset = 1
        return lease.used - lease.left, reset, lease.redis_ms + elapsed_ms

    def _top_up_soon(self, lim: Limit, lease: _Lease) -> None:
        """Ask for the next lease in the background while the window is far
        from its capacity (see the module's docstring)."""
        size = _grown(lim, lease.size, lease.used)  # running low within its slot: as running out
        ask = size * lim.cost
        if lim.concurrency or lim.capacity - lease.used < FAR_LEASES * 16 * ask:
            return  # near the limit: leases shrink, requests go to Redis
        lease.size = size
        top_up_soon(self._topping, lease, "permit", log, self._top_up, lim, lease, ask)

    async def _top_up(self, lim: Limit, lease: _Lease, ask: int) -> None:
        asked = self._clock()
        if self._leases.get(lim.key) is not lease or asked >= lease.ends:
            return  # replaced, or its slot is over: the next request refills
        self.top_ups += 1
        probe = Limit(lim.key, lim.name, lim.capacity, lim.window_ms, 0)
        verdict, grants = await self.limiter.check_leasing([probe], 1, [LeaseAsk(extra=ask)])
        if verdict.admitted and verdict.shared:
            self._keep(lim, verdict.windows[0], grants[0], verdict.now_ms, asked)

    async def settle_top_ups(self) -> None:
        """Wait for the top-ups under way (before Redis is closed)."""
        await self._topping.drain(grace=10)

    async def check(self, limits: Sequence[Limit], instances: int) -> Verdict:
        """``RateLimiter.check`` with commit, from the leases when they cover
        every limit of the request, else in Redis (taking new leases)."""
        verdict = self.take(limits)
        if verdict is not None:
            return verdict
        now = self._clock()
        leased = {
            lim.key: lease
            for lim in limits
            if (lease := self._leases.get(lim.key)) is not None and lease.covers(lim.cost, now)
        }
        if len(leased) == len(limits):
            self.local_admits += 1
            return self._local(limits, leased, now)
        remote = [lim for lim in limits if lim.key not in leased]
        asks = [self._ask(lim, now) for lim in remote]
        verdict, grants = await self.limiter.check_leasing(remote, instances, asks)
        windows = dict(zip((lim.key for lim in remote), verdict.windows, strict=True))
        if verdict.admitted:
            for lim in limits:
                if lim.key in leased:
                    leased[lim.key].left -= lim.cost
            if verdict.shared:
                for lim, w, grant in zip(remote, verdict.windows, grants, strict=True):
                    if lease := self._keep(lim, w, grant, verdict.now_ms, now):
                        leased[lim.key] = lease  # its window: without the unused units
        for lim in limits:
            if lim.key in leased:
                windows[lim.key] = _window(lim, leased[lim.key], self._clock())
        ordered = tuple(windows[lim.key] for lim in limits)
        return Verdict(verdict.admitted, ordered, verdict.now_ms, verdict.shared)

    def _ask(self, lim: Limit, now: float) -> LeaseAsk:
        """The lease to ask for, and the unused rest of the last one to give back."""
        if lim.concurrency:
            return LeaseAsk()
        old = self._leases.get(lim.key)
        if old is None:
            return LeaseAsk(extra=lim.cost)
        ran_out = now < old.ends  # used up within its slot: a bigger one next
        old.size = _grown(lim, old.size, old.used) if ran_out else max(1, old.size // 2)
        back, old.left = old.left, 0
        return LeaseAsk(extra=old.size * lim.cost, slot=old.slot, back=back)

    def _keep(self, lim: Limit, w: Window, grant: int, now_ms: int, asked: float) -> _Lease | None:
        if lim.concurrency or grant <= 0:
            return None
        slot_ms = lim.window_ms // SLOTS
        slot = now_ms // slot_ms
        # Redis ran the script after ``asked``: the slot ends no later than this.
        ends = asked + ((slot + 1) * slot_ms - now_ms) / 1000
        old = self._leases.get(lim.key)
        if old is not None and old.slot == slot:
            # Same slot: one lease, usable until the later of the two ends
            # each call proves (a top-up that lands after the lease's local
            # end, still in its slot, is not thrown away), its rest given
            # back in one piece by the next refill.
            old.left += grant
            old.used = max(old.used, w.used)
            old.ends = max(old.ends, ends)
            return old
        size = old.size if old is not None else 1
        lease = _Lease(slot, ends, grant, w.used, w.reset_ms, now_ms, asked, size)
        self._leases[lim.key] = lease
        self._leases.move_to_end(lim.key)
        if len(self._leases) > self._max:
            self._leases.popitem(last=False)  # its unused units stay counted: safe
        return lease

    def _local(self, limits: Sequence[Limit], leased: dict[str, _Lease], now: float) -> Verdict:
        for lim in limits:
            leased[lim.key].left -= lim.cost
        windows = tuple(_window(lim, leased[lim.key], now) for lim in limits)
        first = leased[limits[0].key]
        return Verdict(True, windows, first.redis_ms + int((now - first.taken_at) * 1000), True)


def _grown(lim: Limit, size: int, used: int) -> int:
    """The next lease's size after one that ran out (or low) within its
    slot: twice as many requests' worth, up to ``BASE_SIZE``; beyond it, up
    to ``MAX_SIZE`` while the window (``used`` of it counted at the last
    lease) has room for ``FAR_LEASES * 16`` leases of that size."""
    size *= 2
    if size <= BASE_SIZE:
        return size
    room = (lim.capacity - used) // (FAR_LEASES * 16 * max(1, lim.cost))
    return max(BASE_SIZE, min(MAX_SIZE, size, room))


def _window(lim: Limit, lease: _Lease, now: float) -> Window:
    """The window as this worker knows it: the units counted at lease time,
    less what it has not used of its lease."""
    elapsed_ms = int((now - lease.taken_at) * 1000)
    reset = max(1, lease.reset_ms - elapsed_ms) if lease.reset_ms else 0
    return Window(lim, lim.capacity, True, lease.used - lease.left, reset, 0)
