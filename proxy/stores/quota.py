"""The admit stage's monthly quota: exact, without a query per request.

Each worker leases quota from Postgres in blocks (``tollway_take_lease``: one
atomic statement under the tenant's counter row lock) and admits requests
from its local lease. A block is at most 1/8 of what is left, so leases
shrink to single units near the limit, and the sum of everything admitted
can never pass the limit: with 10 requests left and 200 concurrent requests,
exactly 10 are admitted.

A request reserves one request and ``prompt estimate + max_tokens`` tokens
(the tier's ``max_tokens`` cap when the client sends none; the forwarded
request carries that cap). Settling refunds the unused part to the local
lease. Token overshoot is therefore bounded by the prompt estimate's error
(a size-based estimate, ``tokens.estimate_text``: at most 1.5x under the
true count on crafted text, never under it on realistic text), and a
reasoning model may be billed beyond ``max_tokens`` by its provider.

A worker's lease is topped up in the background when it falls to half
of its block (``take``), so under load a request seldom finds it empty and
waits for Postgres, and the requests in flight do not all queue behind one
refill. Only while Postgres had at least ``FAR_BLOCKS`` blocks more to give
at the last lease call: near the limit nothing is leased ahead, and the
1/8 rule above applies exactly as without it. A busy lease's lease calls
(top-ups and refills alike) grow up to ``MAX_SCALE`` blocks, and its
low-water mark with them (``lease_pace``), so a tenant sending thousands of
requests a second to a worker costs it about one lease call a second, not
one per block. A top-up takes its block
with the same statement as a refill, so the bound is the same: nothing is
admitted that Postgres did not lease; and it does not hold the lease's
lock, so a request that finds the lease short still refills it itself, as
before (a top-up that lands too late only adds to the lease).

Every counted token reaches the tenant's counter, whatever the tier said
when it was used; a lease row stops at zero when settled usage exceeds what
it held, so usage under a tier without a token limit is not handed back as
headroom after a change to a tier with one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import NamedTuple

import asyncpg

from proxy.config.tiers import BillingPolicy, Tier
from proxy.core.errors import QuotaExceeded, ServiceUnavailable
from proxy.core.principal import Principal
from proxy.core.tasks import TaskGroup
from proxy.stores import pgwait
from proxy.stores.lease_pace import far_block, low_water, scaled, top_up_soon

log = logging.getLogger("tollway.quota")

Clock = Callable[[], datetime]
_REFILL_TRIES = 8  # lease calls one admission may make before it gives up


def utc_now() -> datetime:
    return datetime.now(UTC)


def period_of(moment: datetime) -> date:
    return date(moment.year, moment.month, 1)


def period_end(period: date) -> datetime:
    """The first instant of the next month, when the quota resets."""
    year, month = (period.year + 1, 1) if period.month == 12 else (period.year, period.month + 1)
    return datetime(year, month, 1, tzinfo=UTC)


@dataclass(slots=True)
class Reservation:
    tenant_id: int
    period: date
    requests: int
    tokens: int
    leased: bool  # taken from a Postgres lease (vs unlimited or offline allowance)
    # The local lease it was taken from, when known: ``release`` gives back
    # to it without a lookup while the book still holds it (not ``dropped``).
    lease: _Lease | None = field(default=None, compare=False, repr=False)


@dataclass(slots=True)
class _Lease:
    requests: int = 0
    tokens: int = 0
    left_requests: int | None = None  # headroom in Postgres at the last lease call
    left_tokens: int | None = None
    exhausted_until: float = 0.0
    refilled_at: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    topping: bool = False  # a background top-up is under way
    scale: int = 1  # blocks a top-up asks for (``lease_pace.scaled``)
    busy_since: float = 0.0  # since when lease calls came less than ``BUSY_S`` apart
    # Below these a top-up is asked for (half of what it asks: ``lease_pace``).
    low_requests: int = 1
    low_tokens: int = 1
    # Out of the book's map (``keep_only``): whoever kept a reference to it
    # (a key's admission object, a reservation) looks the lease up again.
    dropped: bool = False


@dataclass(frozen=True, slots=True)
class _Month:
    """A quota period's bounds, as datetimes and as epoch seconds."""

    period: date
    start: datetime
    end: datetime
    start_ts: float
    end_ts: float

    @classmethod
    def of(cls, period: date) -> _Month:
        start = datetime(period.year, period.month, 1, tzinfo=UTC)
        end = period_end(period)
        return cls(period, start, end, start.timestamp(), end.timestamp())


class Held(NamedTuple):
    """``current``'s answer: the month (its bounds and period) and the
    tenant's lease of it (the book's own object, for ``take_from``)."""

    month: _Month
    lease: _Lease


@dataclass(frozen=True, slots=True)
class Standing:
    """What the ``x-ratelimit-*`` headers report for a tenant this month."""

    limit_requests: int | None
    remaining_requests: int | None
    limit_tokens: int | None
    remaining_tokens: int | None
    reset_seconds: float


class QuotaBook:
    def __init__(
        self, pool: asyncpg.Pool, worker_id: str, policy: BillingPolicy, clock: Clock = utc_now
    ) -> None:
        self._pool = pool
        self.worker_id = worker_id
        self._policy = policy
        self.clock = clock
        self._leases: dict[tuple[int, date], _Lease] = {}
        self._offline_used = 0
        self._db_wait = pgwait.Budget(policy.db_timeout_s)
        self.lease_calls = 0
        self.top_ups = 0  # lease calls made in the background, ahead of need
        self._current: _Month | None = None  # the clock's month at the last reading
        self._topping = TaskGroup()

    def _lease(self, tenant_id: int, period: date) -> _Lease:
        lease = self._leases.get((tenant_id, period))
        if lease is None:
            lease = self._leases[(tenant_id, period)] = _Lease()
            self._pace(lease, None)
        return lease

    def _blocks(self, tier: Tier | None, lease: _Lease) -> tuple[int, int]:
        """(requests, tokens) a lease call of ``lease`` asks for ahead of
        need: its ``scale`` of blocks while far from the limit, else 0
        (``lease_pace.far_block``)."""
        policy = self._policy
        if tier is not None and tier.monthly_requests is None:
            ahead_r = policy.lease_requests * lease.scale
        else:
            ahead_r = far_block(policy.lease_requests, lease.scale, lease.left_requests)
        return ahead_r, far_block(policy.lease_tokens, lease.scale, lease.left_tokens)

    def _pace(self, lease: _Lease, tier: Tier | None) -> tuple[int, int]:
        """Set the lease's low-water marks: half of what its next top-up asks
        for (``lease_pace.low_water``). Returns that ``_blocks``, for a
        caller about to ask."""
        blocks = self._blocks(tier, lease)
        lease.low_requests = low_water(self._policy.lease_requests, blocks[0])
        lease.low_tokens = low_water(self._policy.lease_tokens, blocks[1])
        return blocks

    def _month(self) -> tuple[date, datetime, datetime]:
        """(period, now, the period's end) by one reading of the clock; the
        month's bounds are kept until the clock leaves them."""
        now = self.clock()
        month = self._current
        if now.tzinfo is not UTC or month is None or not month.start <= now < month.end:
            period = period_of(now)  # the clock's own month, as before
            month = self._current = _Month.of(period)
        return month.period, now, month.end

    def take(
        self, who: Principal, tier: Tier, tokens: int, at: float | None = None
    ) -> Reservation | None:
        """``admit`` when the local lease has room (the common case): no
        coroutine, no await. None: ``admit`` must refill it, or refuse.
        ``at``: ``time.time()`` as the caller read it just now (one reading
        for the whole admission); only with the system clock (``utc_now``)."""
        month = self._current  # ``_period()`` inline: this runs for every request
        if (
            self.clock is utc_now
            and month is not None
            and month.start_ts <= (time.time() if at is None else at) < month.end_ts
        ):
            period = month.period
        else:
            period = self._month()[0]
        if tier.monthly_requests is None and tier.monthly_tokens is None:
            return Reservation(who.tenant_id, period, 1, tokens, leased=False)
        lease = self._leases.get((who.tenant_id, period))
        if lease is None:
            return None
        return self.take_from(lease, who, tier, period, tokens)

    def current(self, tenant_id: int, at: float) -> Held | None:
        """The tenant's lease of the month of ``at`` (``time.time()``), with
        that month, for a caller that keeps it and takes with ``take_from``
        while ``at`` is inside the month's bounds;
        None: the clock is not the system's, or there is no lease yet."""
        month = self._current
        if self.clock is not utc_now or month is None or not month.start_ts <= at < month.end_ts:
            return None
        lease = self._leases.get((tenant_id, month.period))
        if lease is None:
            return None
        return Held(month, lease)

    def take_from(
        self, lease: _Lease, who: Principal, tier: Tier, period: date, tokens: int
    ) -> Reservation | None:
        """``take`` from the tenant's lease of ``period`` (a tier with a
        monthly limit): one request and, under a token limit, ``tokens``; a
        top-up asked for when it runs low. None: short, or ``dropped`` (the
        caller looks it up again, or ``admit`` refills it)."""
        need_tokens = tokens if tier.monthly_tokens is not None else 0
        if lease.requests < 1 or lease.tokens < need_tokens or lease.dropped:
            return None
        lease.requests -= 1
        lease.tokens -= need_tokens
        if (
            lease.requests < lease.low_requests or (need_tokens and lease.tokens < lease.low_tokens)
        ) and not lease.topping:
            self._top_up_soon(who, tier, period, lease)
        return Reservation(who.tenant_id, period, 1, need_tokens, True, lease)

    def _top_up_soon(self, who: Principal, tier: Tier, period: date, lease: _Lease) -> None:
        """Lease the next block in the background if the lease runs low and
        Postgres is far from the limit (see the module's docstring)."""
        want_r, want_t = self._ahead(tier, lease)
        if want_r or want_t:
            top_up_soon(self._topping, lease, "quota", log, self._top_up, who, tier, period, lease)

    def _ahead(
        self, tier: Tier, lease: _Lease, blocks: tuple[int, int] | None = None
    ) -> tuple[int, int]:
        """(requests, tokens) worth leasing ahead of need now: ``_blocks``
        (``blocks`` when the caller has them already) of whichever runs
        low, and only while far from its limit."""
        if tier.monthly_requests is not None and lease.left_requests is None:
            return 0, 0  # nothing leased yet: the first block comes through ``admit``
        ahead_r, ahead_t = self._blocks(tier, lease) if blocks is None else blocks
        low_t = tier.monthly_tokens is not None and lease.tokens < lease.low_tokens
        return (ahead_r if lease.requests < lease.low_requests else 0, ahead_t if low_t else 0)

    async def _top_up(self, who: Principal, tier: Tier, period: date, lease: _Lease) -> None:
        """Not under the lease's lock: a request that finds the lease short
        meanwhile refills it itself, exactly as without top-ups (and during
        an outage waits no longer than it did, or goes offline)."""
        scaled(lease, time.monotonic())
        want_r, want_t = self._ahead(tier, lease, self._pace(lease, tier))
        if not (want_r or want_t):
            return  # a refill got there first
        self.top_ups += 1
        await self._take_lease(who, tier, period, lease, want_r, want_t, 0)

    async def settle_top_ups(self) -> None:
        """Wait for the top-ups under way (before the leases are handed back)."""
        await self._topping.drain(grace=10)

    async def admit(self, who: Principal, tier: Tier, tokens: int) -> Reservation:
        period = self._month()[0]
        if tier.monthly_requests is None and tier.monthly_tokens is None:
            return Reservation(who.tenant_id, period, 1, tokens, leased=False)
        need_tokens = tokens if tier.monthly_tokens is not None else 0
        lease = self._lease(who.tenant_id, period)
        if not _fits(lease, need_tokens):
            async with lease.lock:
                if not _fits(lease, need_tokens):
                    offline = await self._refill(who, tier, period, lease, need_tokens)
                    if offline is not None:
                        return offline
        lease.requests -= 1
        lease.tokens -= need_tokens
        return Reservation(who.tenant_id, period, 1, need_tokens, True, lease)

    async def _refill(
        self, who: Principal, tier: Tier, period: date, lease: _Lease, need_tokens: int
    ) -> Reservation | None:
        if lease.exhausted_until > time.monotonic():
            raise _exhausted(tier, lease, need_tokens, period_end(period) - self.clock())
        # Requests that still fit keep being admitted while we wait on Postgres
        # (refunds make room for them), so the lease may run short of what we
        # did not ask for. Only a grant of nothing for what we asked means the
        # month is used up; otherwise ask again for what is short now. A busy
        # lease asks for its scaled blocks here too, while far from the limit.
        scaled(lease, time.monotonic())
        block_r, block_t = self._policy.lease_requests, self._policy.lease_tokens
        for _ in range(_REFILL_TRIES):
            ahead_r, ahead_t = self._blocks(tier, lease)
            want_r = max(block_r, ahead_r) if lease.requests < 1 else 0
            short_t = max(0, need_tokens - lease.tokens)
            want_t = max(short_t, block_t, ahead_t) if short_t else 0
            try:
                row = await self._take_lease(who, tier, period, lease, want_r, want_t, short_t)
            except pgwait.DatabaseDown:
                return self._offline(who, period, need_tokens)
            if _fits(lease, need_tokens):
                return None
            if (want_r and not row["got_requests"]) or (short_t and not row["got_tokens"]):
                break
        # Nothing left: answer the next requests from here for a moment.
        lease.exhausted_until = time.monotonic() + 0.25
        raise _exhausted(tier, lease, need_tokens, period_end(period) - self.clock())

    async def _take_lease(
        self,
        who: Principal,
        tier: Tier,
        period: date,
        lease: _Lease,
        want_r: int,
        want_t: int,
        short_t: int,
    ) -> asyncpg.Record:
        """One lease statement (a refill's or a top-up's), its grant added
        to the local lease."""
        self.lease_calls += 1
        row = await pgwait.fetchrow(
            self._pool,
            self._db_wait,
            "quota lease",
            "SELECT * FROM tollway_take_lease($1, $2, $3, $4, $5, $6, $7, $8)",
            self.worker_id,
            who.tenant_id,
            period,
            want_r,
            want_t,
            short_t,
            tier.monthly_requests,
            tier.monthly_tokens,
        )
        assert row is not None
        lease.refilled_at = time.monotonic()
        lease.requests += row["got_requests"]
        lease.tokens += row["got_tokens"]
        lease.left_requests, lease.left_tokens = row["left_requests"], row["left_tokens"]
        self._pace(lease, tier)
        return row

    def _offline(self, who: Principal, period: date, tokens: int) -> Reservation:
        if self._offline_used < self._policy.offline_allowance:
            self._offline_used += 1
            return Reservation(who.tenant_id, period, 1, tokens, leased=False)
        raise ServiceUnavailable(
            "Quota cannot be checked right now (billing database unreachable); retry shortly.",
            code="billing_unavailable",
            headers={"retry-after": "5"},
        )

    def release(self, reservation: Reservation, counted: bool, tokens_used: int) -> None:
        """Return the unused part of a reservation to the local lease."""
        if not reservation.leased:
            return
        lease = reservation.lease
        if lease is None or lease.dropped:
            key = (reservation.tenant_id, reservation.period)
            lease = self._leases.get(key) or self._lease(*key)  # ``_lease`` inline: per request
        if counted:
            lease.tokens += reservation.tokens - (tokens_used if reservation.tokens else 0)
        else:
            lease.requests += reservation.requests
            lease.tokens += reservation.tokens
        lease.exhausted_until = 0.0

    def standing(self, tenant_id: int, tier: Tier) -> Standing:
        period = period_of(self.clock())
        lease = self._leases.get((tenant_id, period)) or _Lease()
        reset = (period_end(period) - self.clock()).total_seconds()
        return Standing(
            limit_requests=tier.monthly_requests,
            remaining_requests=_remaining(
                tier.monthly_requests, lease.left_requests, lease.requests
            ),
            limit_tokens=tier.monthly_tokens,
            remaining_tokens=_remaining(tier.monthly_tokens, lease.left_tokens, lease.tokens),
            reset_seconds=max(0.0, reset),
        )

    def tokens_left(self, tenant_id: int, limit: int) -> tuple[int, float]:
        """``standing``'s remaining tokens and reset seconds for a tier with a
        monthly token ``limit``: what every response's ``-tokens`` headers
        report, without building the whole standing."""
        month = self._current
        if self.clock is utc_now and month is not None:
            # The system clock: seconds since the epoch against the month's
            # bounds as timestamps, no datetime arithmetic per response.
            t = time.time()
            if month.start_ts <= t < month.end_ts:
                lease = self._leases.get((tenant_id, month.period))
                return _tokens_remaining(limit, lease), month.end_ts - t
        period, now, end = self._month()
        return _tokens_remaining(limit, self._leases.get((tenant_id, period))), max(
            0.0, (end - now).total_seconds()
        )

    def keep_only(self, alive: set[tuple[int, date]], checked_at: float) -> None:
        """Drop local leases whose Postgres rows were gone at ``checked_at``
        (swept while this worker was cut off): they are no longer ours."""
        for key in [k for k in self._leases if k not in alive]:
            lease = self._leases[key]
            if lease.refilled_at < checked_at and not lease.lock.locked() and not lease.topping:
                del self._leases[key]
                lease.dropped = True

    async def used(self, tenant_id: int, period: date) -> tuple[int, int]:
        """(requests, tokens) counted in Postgres for the tenant's month."""
        row = await self._pool.fetchrow(
            "SELECT requests_used, tokens_used FROM quota_counters"
            " WHERE tenant_id = $1 AND period = $2",
            tenant_id,
            period,
        )
        return (row["requests_used"], row["tokens_used"]) if row else (0, 0)


def _fits(lease: _Lease, tokens: int) -> bool:
    return lease.requests >= 1 and lease.tokens >= tokens


def _tokens_remaining(limit: int, lease: _Lease | None) -> int:
    """``standing``'s remaining tokens (``_remaining``) of a limited month."""
    if lease is None:
        return limit
    # ``max`` spelled out: every response's headers read it
    left, local = lease.left_tokens, lease.tokens
    left = (left if left is not None else limit) + (local if local > 0 else 0)
    return left if left > 0 else 0


def _remaining(limit: int | None, left: int | None, local: int) -> int | None:
    if limit is None:
        return None
    return max(0, (left if left is not None else limit) + max(0, local))


def _exhausted(
    tier: Tier, lease: _Lease, need_tokens: int, until_reset: timedelta
) -> QuotaExceeded:
    if lease.requests < 1:
        what = f"monthly request quota ({tier.monthly_requests} requests on the '{tier.name}' tier)"
    else:
        what = (
            f"monthly token quota ({tier.monthly_tokens} tokens on the '{tier.name}' tier; "
            f"this request reserves {need_tokens} tokens: prompt + max_tokens)"
        )
    retry = int(until_reset.total_seconds()) + 1
    exc = QuotaExceeded(
        f"You exceeded your {what}. It resets at the start of next month (UTC).",
        headers={"retry-after": str(max(1, retry)), "x-should-retry": "false"},
    )
    exc.reason = "requests" if lease.requests < 1 else "tokens"
    return exc
