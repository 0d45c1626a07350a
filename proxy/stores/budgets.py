"""USD budgets, enforced as exactly as the token quota, in micro-dollars.

The same lease scheme as ``proxy.stores.quota``: each worker leases blocks of
a budget from Postgres (``tollway_take_budget_lease``, one atomic statement
under the budget's counter row lock; a block is at most 1/8 of what is left
and at least one request's maximum cost) and admits from its local lease
without a query. A request reserves its maximum cost from every budget that
applies to it (tenant month/day, key month/day); if one of them has no room
the others get their part back and the request is refused. Settling refunds
the difference between the reservation and the real cost to the local
leases; the ledger moves the counters and shrinks the Postgres leases by the
real cost in the transaction that inserts the usage row
(``proxy.stores.ledger``), so ``limit - used - leases`` is never negative.

As with the quota, a lease is topped up in the background when it falls
below half of what its next top-up asks for, only while Postgres had
``FAR_BLOCKS`` of that more to give, and a busy lease's top-ups grow
(``proxy.stores.lease_pace``): a request seldom waits for Postgres, and near
the limit only the request path leases, as without top-ups.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import asyncpg

from proxy.config.budgets import usd
from proxy.core.errors import QuotaExceeded, ServiceUnavailable
from proxy.core.tasks import TaskGroup
from proxy.stores import pgwait
from proxy.stores.lease_pace import far_block, low_water, scaled, top_up_soon

log = logging.getLogger("tollway.budgets")

_REFILL_TRIES = 8


@dataclass(frozen=True, slots=True)
class Limit:
    """One budget a request must fit: whose, which span, how much."""

    subject: str  # 't:<tenant id>' or 'k:<key id>'
    span: str  # 'month' or 'day'
    period: date  # first day of the month, or the day (UTC)
    micros: int
    label: str  # how the 429 names it: "tenant 'acme' monthly budget"
    key: tuple[str, str, date] = field(init=False, compare=False, repr=False)  # its lease's

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.subject, self.span, self.period))


@dataclass(slots=True)
class Hold:
    """What a request reserved: ``micros`` from each of ``limits``."""

    limits: tuple[Limit, ...]
    micros: int
    day: date
    # The local leases it was taken from, in the order of ``limits`` (empty:
    # unknown): ``release`` gives back to them without a lookup while the
    # book still holds them (not ``dropped``).
    leases: tuple[_Lease, ...] = field(default=(), compare=False, repr=False)


@dataclass(slots=True)
class _Lease:
    micros: int = 0
    left: int | None = None  # headroom in Postgres at the last lease call
    exhausted_until: float = 0.0
    exhausted_at: int = 0  # the limit it was exhausted under: a changed budget asks again
    refilled_at: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Out of the book's map (``keep_only``): whoever kept a reference to it
    # (a key's admission object, a hold) looks the lease up again.
    dropped: bool = False
    topping: bool = False  # a background top-up is under way
    scale: int = 1  # blocks a top-up asks for (``lease_pace.scaled``)
    busy_since: float = 0.0
    low: int = 1  # below this a top-up is asked for (``lease_pace.low_water``)


_Key = tuple[str, str, date]
# ``leases_of``' answer: the local leases of some limits, in their order (the
# book's own objects, for ``take_from``).
Leases = tuple[_Lease, ...]


class BudgetBook:
    def __init__(self, pool: asyncpg.Pool, worker_id: str, block_micros: int, db_timeout: float):
        self._pool = pool
        self.worker_id = worker_id
        self._block = max(1, block_micros)
        self._db_wait = pgwait.Budget(db_timeout)
        self._leases: dict[_Key, _Lease] = {}
        self.lease_calls = 0
        self.top_ups = 0  # lease calls made in the background, ahead of need
        self._topping = TaskGroup()

    def _lease(self, limit: Limit) -> _Lease:
        lease = self._leases.get(limit.key)
        if lease is None:
            lease = self._leases[limit.key] = _Lease(low=low_water(self._block, 0))
        return lease

    def _ahead(self, lease: _Lease) -> int:
        """What a top-up asks for now: ``scale`` blocks while far from the limit."""
        return far_block(self._block, lease.scale, lease.left)

    def take(self, limits: tuple[Limit, ...], micros: int, day: date) -> Hold | None:
        """Reserve ``micros`` from the local leases alone, when every one of
        them has room (the common case: no await, no query); None: ``admit``
        must refill one, or refuse."""
        leases = self.leases_of(limits)
        return None if leases is None else self.take_from(leases, limits, micros, day)

    def leases_of(self, limits: tuple[Limit, ...]) -> Leases | None:
        """The local leases of ``limits``, in their order, for a caller that
        keeps them and takes with ``take_from``; None: one is not leased yet."""
        leases = self._leases
        found = []
        for limit in limits:
            lease = leases.get(limit.key)
            if lease is None:
                return None
            found.append(lease)
        return tuple(found)

    def take_from(
        self, leases: Leases, limits: tuple[Limit, ...], micros: int, day: date
    ) -> Hold | None:
        """``take`` from ``limits``' local leases (``leases_of``'s): ``micros``
        from each when every one has room and none is ``dropped`` (else None:
        the caller looks them up again, or ``admit`` refills them)."""
        for lease in leases:
            if lease.micros < micros or lease.dropped:
                return None
        for lease in leases:
            lease.micros -= micros
            if lease.micros < lease.low and not lease.topping:
                self._top_up_soon(limits, leases, lease)
        return Hold(limits, micros, day, leases)

    def _top_up_soon(self, limits: tuple[Limit, ...], leases: Leases, lease: _Lease) -> None:
        """Lease the next block of ``lease`` (one of ``limits``' ``leases``, in
        their order) in the background while far from the limit."""
        if self._ahead(lease):
            limit = next(lim for lim, held in zip(limits, leases, strict=True) if held is lease)
            top_up_soon(self._topping, lease, "budget", log, self._top_up, limit, lease)

    async def _top_up(self, limit: Limit, lease: _Lease) -> None:
        """Not under the lease's lock: a request that finds the lease short
        meanwhile refills it itself, exactly as without top-ups."""
        scaled(lease, time.monotonic())
        want = self._ahead(lease)
        lease.low = low_water(self._block, want)
        if not want or lease.micros >= lease.low:
            return  # a refill got there first
        self.top_ups += 1
        await self._lease_call(limit, lease, want, 0)

    async def settle_top_ups(self) -> None:
        """Wait for the top-ups under way (before the leases are handed back)."""
        await self._topping.drain(grace=10)

    async def admit(self, limits: tuple[Limit, ...], micros: int, day: date) -> Hold:
        """Reserve ``micros`` from every budget in ``limits``, or none of them."""
        taken: list[Limit] = []
        try:
            for limit in limits:
                await self._take(limit, micros)
                taken.append(limit)
        except BaseException:
            for limit in taken:
                self._lease(limit).micros += micros
            raise
        return Hold(tuple(taken), micros, day)

    async def _take(self, limit: Limit, micros: int) -> None:
        lease = self._lease(limit)
        if lease.micros < micros:
            async with lease.lock:
                if lease.micros < micros:
                    await self._refill(limit, lease, micros)
        lease.micros -= micros

    async def _refill(self, limit: Limit, lease: _Lease, micros: int) -> None:
        if lease.exhausted_until > time.monotonic() and lease.exhausted_at == limit.micros:
            raise over_budget(limit, micros)
        scaled(lease, time.monotonic())  # a busy lease asks for its scaled blocks here too
        for _ in range(_REFILL_TRIES):
            short = micros - lease.micros
            want = max(short, self._block, self._ahead(lease))
            try:
                got = await self._lease_call(limit, lease, want, short)
            except pgwait.DatabaseDown:
                raise ServiceUnavailable(
                    "Budgets cannot be checked right now (billing database unreachable);"
                    " retry shortly.",
                    code="billing_unavailable",
                    headers={"retry-after": "5"},
                ) from None
            if lease.micros >= micros:
                return
            if not got:
                break
        lease.exhausted_until = time.monotonic() + 0.25
        lease.exhausted_at = limit.micros
        raise over_budget(limit, micros)

    async def _lease_call(self, limit: Limit, lease: _Lease, want: int, need: int) -> int:
        """One lease statement (a refill's or a top-up's), its grant added
        to the local lease; what it granted."""
        self.lease_calls += 1
        row = await pgwait.fetchrow(
            self._pool,
            self._db_wait,
            "budget lease",
            "SELECT * FROM tollway_take_budget_lease($1, $2, $3, $4, $5, $6, $7)",
            self.worker_id,
            limit.subject,
            limit.span,
            limit.period,
            want,
            need,
            limit.micros,
        )
        assert row is not None
        lease.refilled_at = time.monotonic()
        lease.micros += row["got"]
        lease.left = row["left_micros"]
        lease.low = low_water(self._block, self._ahead(lease))
        return int(row["got"])

    def release(self, hold: Hold, spent: int) -> None:
        """Give back what the request reserved and did not spend."""
        back, kept = hold.micros - spent, hold.leases
        if kept:  # the leases it was taken from: looked up only if one was dropped
            for lease in kept:
                if lease.dropped:
                    break
            else:
                for lease in kept:
                    lease.micros += back
                    lease.exhausted_until = 0.0
                return
        leases = self._leases
        for limit in hold.limits:
            lease = leases.get(limit.key) or self._lease(limit)
            lease.micros += back
            lease.exhausted_until = 0.0

    def remaining(self, limit: Limit) -> int | None:
        """Headroom as this worker last saw it (Postgres' plus its own lease)."""
        lease = self._leases.get(limit.key)
        if lease is None or lease.left is None:
            return None
        return max(0, lease.left + max(0, lease.micros))

    def keep_only(self, alive: set[_Key], checked_at: float) -> None:
        """Drop local leases whose Postgres rows were gone at ``checked_at``
        (swept while this worker was cut off): they are no longer ours."""
        for key in [k for k in self._leases if k not in alive]:
            lease = self._leases[key]
            if lease.refilled_at < checked_at and not lease.lock.locked() and not lease.topping:
                del self._leases[key]
                lease.dropped = True

    async def spent(self, subject: str, span: str, period: date) -> int:
        """Settled micro-dollars of one budget (0 when nothing was spent)."""
        value = await self._pool.fetchval(
            "SELECT used_micros FROM budget_counters"
            " WHERE subject = $1 AND span = $2 AND period = $3",
            subject,
            span,
            period,
        )
        return int(value or 0)


def resets_at(limit: Limit) -> datetime:
    """The first instant of the next month or day (UTC): when the budget resets."""
    p = limit.period
    if limit.span == "day":
        return datetime(p.year, p.month, p.day, tzinfo=UTC) + timedelta(days=1)
    year, month = (p.year + 1, 1) if p.month == 12 else (p.year, p.month + 1)
    return datetime(year, month, 1, tzinfo=UTC)


def over_budget(limit: Limit, micros: int) -> QuotaExceeded:
    resets = "next month (UTC)" if limit.span == "month" else "tomorrow (UTC)"
    retry = int((resets_at(limit) - datetime.now(UTC)).total_seconds()) + 1
    exc = QuotaExceeded(
        f"You exceeded your {limit.label} (${usd(limit.micros)}): this request may cost up"
        f" to ${usd(micros)} and the budget has less left. It resets {resets}.",
        headers={"retry-after": str(max(1, retry)), "x-should-retry": "false"},
    )
    exc.reason = "budget"
    return exc
