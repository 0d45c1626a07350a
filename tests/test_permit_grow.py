"""Permit leases that grow past ``BASE_SIZE`` far from the limit
(``permits._grown``), on a real Redis: a busy key goes to Redis less often,
the count stays exact, and a key nearer its limit leases as before."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from proxy.stores.permits import BASE_SIZE, FAR_LEASES, MAX_SIZE, PermitLeases, _grown
from proxy.stores.ratelimit import RateLimiter
from proxy.stores.redis_client import RedisOptions, SharedRedis, open_client
from proxy.stores.windows import HOUR_MS, Limit
from tests.db import unique


def _hourly(cap: int) -> Limit:
    return Limit(f"tw:test:{{{unique('k')}}}:rph", "requests_per_hour", cap, HOUR_MS)


def test_beyond_the_base_size_a_lease_grows_only_far_from_the_capacity() -> None:
    assert _grown(_hourly(10**9), 16, 0) == 32
    assert _grown(_hourly(10**9), BASE_SIZE, 0) == 2 * BASE_SIZE
    assert _grown(_hourly(10**9), MAX_SIZE, 0) == MAX_SIZE
    # Room for FAR_LEASES * 16 leases of 128, not of 256: 128.
    assert _grown(_hourly(FAR_LEASES * 16 * 128 + 1000), 128, 1000) == 128
    # A window of 2,500 (or anything with room for fewer than 64 leases of
    # 128): never past BASE_SIZE, as before.
    assert _grown(_hourly(2_500), BASE_SIZE, 0) == BASE_SIZE
    assert _grown(_hourly(2_500), BASE_SIZE, 2_400) == BASE_SIZE


@pytest.fixture
async def worker(redis_url: str) -> AsyncIterator[PermitLeases]:
    shared = SharedRedis(RedisOptions(redis_url, timeout_s=2.0))
    leases = PermitLeases(RateLimiter(shared))
    yield leases
    await leases.settle_top_ups()
    await shared.close()


async def _busy_key(worker: PermitLeases, n: int) -> tuple[Limit, int, int]:
    """``n`` requests, one after another, a top-up's round trip between two:
    (the window, requests that waited for Redis, the window's used at the end)."""
    lim = _hourly(1_000_000_000)
    waited = used = 0
    for _ in range(n):
        verdict = worker.take([lim])
        if verdict is None:
            waited += 1
            verdict = await worker.check([lim], 1)
        assert verdict.admitted
        used = verdict.windows[0].used
        await worker.settle_top_ups()
    return lim, waited, used


async def test_a_busy_key_far_from_its_limit_goes_to_redis_seldom_and_counts_exactly(
    worker: PermitLeases, redis_url: str
) -> None:
    r = open_client(RedisOptions(redis_url, timeout_s=2.0))
    try:
        for _ in range(3):  # a run that crossed a 6 s slot boundary is run again
            before = await r.time()
            top_ups = worker.top_ups
            lim, waited, used = await _busy_key(worker, 3000)
            after = await r.time()
            if before[0] // 6 == after[0] // 6:
                break
        counted = int(await r.hget(lim.key, "sum") or 0)
    finally:
        await r.aclose()
    assert waited == 1  # the first: no lease yet
    # 2, 4, ... 1,024 requests' worth, then 1,024 each: 10 top-ups for the
    # first 2,047, one or two more by 3,000 (leases of 64 would take 50).
    assert worker.top_ups - top_ups <= 13
    assert used == 3000  # the headers count exactly this worker's requests
    # Counted when leased: this worker's requests plus its lease's unused
    # rest (under two leases' worth: a top-up lands while half of one is left).
    assert 3000 <= counted < 3000 + 2 * MAX_SIZE
