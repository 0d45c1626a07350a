"""Permit leases topped up in the background (``proxy/stores/permits.py``),
on a real Redis: far from the limit a worker's requests stop finding the
lease empty, near it nothing is leased ahead, and the bound stays exact."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.stores.permits import PermitLeases
from proxy.stores.ratelimit import RateLimiter
from proxy.stores.redis_client import RedisOptions, SharedRedis, open_client
from proxy.stores.windows import HOUR_MS, Limit
from tests.db import unique


@pytest.fixture
async def workers(redis_url: str) -> AsyncIterator[list[PermitLeases]]:
    """Two workers' leases, each on its own connection to one Redis (a long
    timeout: a stalled reply must not switch a worker to its fallback)."""
    shared = [SharedRedis(RedisOptions(redis_url, timeout_s=2.0)) for _ in range(2)]
    leases = [PermitLeases(RateLimiter(r)) for r in shared]
    yield leases
    for w, r in zip(leases, shared, strict=True):
        await w.settle_top_ups()
        await r.close()


def _hourly(cap: int) -> Limit:
    return Limit(f"tw:test:{{{unique('k')}}}:rph", "requests_per_hour", cap, HOUR_MS)


async def _one(w: PermitLeases, lim: Limit) -> tuple[bool, bool, int]:
    """(admitted, without awaiting Redis, the window's used as the worker reports it)."""
    verdict = w.take([lim])
    local = verdict is not None
    if verdict is None:
        verdict = await w.check([lim], 1)
    return verdict.admitted, local, verdict.windows[0].used


async def test_far_from_the_limit_only_the_first_request_waits_for_redis(
    workers: list[PermitLeases],
) -> None:
    w, lim = workers[0], _hourly(1_000_000)
    waited, used = 0, 0
    for _ in range(300):
        admitted, local, used = await _one(w, lim)
        assert admitted
        waited += not local
        await w.settle_top_ups()  # the request's own work outlasts a top-up's round trip
    assert waited == 1  # the first: no lease yet
    assert w.top_ups >= 6  # 2, 4, ... 64 requests' worth, then 64 each
    assert used == 300  # the headers count exactly this worker's requests


async def test_near_the_limit_nothing_is_leased_ahead(
    workers: list[PermitLeases], redis_url: str
) -> None:
    w, lim = workers[0], _hourly(120)
    results = []
    for _ in range(130):
        results.append((await _one(w, lim))[0])
        await w.settle_top_ups()
    assert w.top_ups == 0
    assert results == [True] * 120 + [False] * 10
    r = open_client(RedisOptions(redis_url, timeout_s=2.0))
    try:
        assert int(await r.hget(lim.key, "sum") or 0) == 120
    finally:
        await r.aclose()


async def test_two_workers_topping_up_never_admit_more_than_the_limit(
    workers: list[PermitLeases], redis_url: str
) -> None:
    cap = 2_500  # top-ups while far, single permits at the end
    lim = _hourly(cap)
    results: list[bool] = []

    async def client(w: PermitLeases, n: int) -> None:
        for _ in range(n):
            results.append((await _one(w, lim))[0])
            await asyncio.sleep(0)  # other requests in flight get their turn

    await asyncio.gather(*(client(workers[i % 2], 200) for i in range(16)))
    for w in workers:
        await w.settle_top_ups()
    assert [w.limiter.fallbacks for w in workers] == [0, 0]  # Redis decided
    assert sum(w.top_ups for w in workers) > 0
    # Never cap + 1; a few permits may stay counted unused (a top-up landing in
    # the next 6 s slot replaces a lease whose rest was at most half of 64).
    assert cap - 128 <= results.count(True) <= cap
    r = open_client(RedisOptions(redis_url, timeout_s=2.0))
    try:
        assert int(await r.hget(lim.key, "sum") or 0) <= cap
    finally:
        await r.aclose()
