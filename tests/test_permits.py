"""Leases of rate-limit permits (``proxy/stores/permits.py``) on a real Redis:
the key's hourly window costs no Redis round trip per request, and the
bound stays exact across workers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from proxy.stores.permits import PermitLeases
from proxy.stores.ratelimit import RateLimiter
from proxy.stores.redis_client import RedisOptions, SharedRedis, open_client
from proxy.stores.windows import HOUR_MS, MINUTE_MS, Limit
from tests.billing_helpers import TEST_TIERS, billing_config, tenant_with_key
from tests.conftest import StartGateway
from tests.db import unique
from tests.fakes import FakeOpenAI
from tests.redis_server import OwnRedis

TIERS: dict[str, Any] = {
    **TEST_TIERS,
    "roomy": {
        "requests_per_hour": 1_000_000,
        "monthly_requests": 100_000,
        "monthly_tokens": 100_000_000,
        "max_tokens": 100,
    },
}


@pytest.fixture
async def workers(redis_url: str) -> AsyncIterator[list[PermitLeases]]:
    """Two workers' leases, each on its own connection to one Redis."""
    # A loaded CI machine can stall a reply past the 50 ms production timeout,
    # which would switch a worker to its per-process fallback (a different,
    # documented bound); this test is about the leases, so Redis must stay up.
    shared = [SharedRedis(RedisOptions(redis_url, timeout_s=2.0)) for _ in range(2)]
    yield [PermitLeases(RateLimiter(r)) for r in shared]
    for r in shared:
        await r.close()


async def test_two_workers_admit_exactly_the_limit(
    workers: list[PermitLeases], redis_url: str
) -> None:
    cap = 300
    lim = Limit(f"tw:test:{{{unique('k')}}}:rph", "requests_per_hour", cap, HOUR_MS)
    results: list[bool] = []

    async def client(w: PermitLeases, n: int) -> None:
        for _ in range(n):
            verdict = await w.check([lim], 1)
            results.append(verdict.admitted)

    await asyncio.gather(*(client(workers[i % 2], 100) for i in range(12)))
    # A worker's unused permits go back with its next Redis call: a last
    # round from each lets the other use them.
    for _ in range(10):
        for w in workers:
            await client(w, 1)
    assert [w.limiter.fallbacks for w in workers] == [0, 0]  # Redis decided every check
    assert results.count(True) == cap  # never cap + 1, and the leases' rest is not lost
    assert sum(w.local_admits for w in workers) > cap // 2  # most without Redis
    r = open_client(RedisOptions(redis_url, timeout_s=2.0))  # a cluster URL too
    try:
        assert int(await r.hget(lim.key, "sum") or 0) == cap
    finally:
        await r.aclose()


async def test_a_lease_is_not_used_once_its_slot_may_have_passed(
    redis_url: str,
) -> None:
    now = [0.0]
    shared = SharedRedis(RedisOptions(redis_url, timeout_s=2.0))
    leases = PermitLeases(RateLimiter(shared), clock=lambda: now[0])
    try:
        lim = Limit(f"tw:test:{{{unique('k')}}}:tpm", "tokens_per_minute", 10_000, MINUTE_MS, 10)
        assert (await leases.check([lim], 1)).admitted  # leases a request's worth more
        assert (await leases.check([lim], 1)).admitted
        assert leases.local_admits == 1
        now[0] += 0.101  # a minute's slot is 100 ms: the lease has ended
        assert (await leases.check([lim], 1)).admitted
        assert leases.local_admits == 1  # asked Redis, not the old lease
    finally:
        await shared.close()


async def test_near_the_limit_every_request_asks_redis(workers: list[PermitLeases]) -> None:
    """Leases are at most 1/16 of what is left: single permits near the cap."""
    lim = Limit(f"tw:test:{{{unique('k')}}}:rph", "requests_per_hour", 16, HOUR_MS)
    results = [(await workers[0].check([lim], 1)).admitted for _ in range(20)]
    assert results == [True] * 16 + [False] * 4
    assert workers[0].local_admits == 0


async def test_billing_path_needs_no_redis_call_per_request(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    own_redis: OwnRedis,
    tmp_path: Path,
) -> None:
    gw = await start_gateway(
        {**billing_config(fake_openai.url), "tiers": TIERS},
        database_url=pg_url,
        data_dir=tmp_path,
        redis_url=own_redis.url,
    )
    _, key = await tenant_with_key(pg, tmp_path, "roomy", set(TIERS))
    r = aioredis.from_url(own_redis.url)

    async def scripts() -> int:
        stats = await r.info("commandstats")
        return sum(
            int(stats.get(c, {}).get("calls", 0)) for c in ("cmdstat_evalsha", "cmdstat_eval")
        )

    try:
        before = await scripts()
        remaining = []
        async with aiohttp.ClientSession() as s:
            for _ in range(40):
                async with s.post(
                    gw.url + "/v1/chat/completions",
                    json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"Authorization": f"Bearer {key['api_key']}"},
                ) as resp:
                    assert resp.status == 200
                    remaining.append(int(resp.headers["x-ratelimit-remaining-requests"]))
        calls = await scripts() - before
    finally:
        await r.aclose()
    assert calls <= 15, f"{calls} rate-limit script calls for 40 requests"
    assert remaining == sorted(remaining, reverse=True)  # still counts down
    assert remaining[-1] <= 1_000_000 - 40
