"""Circuit breakers shared by several instances through a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from proxy.config.model import BreakerPolicy
from proxy.stages.forward.breaker import Breakers
from proxy.stages.forward.breaker_redis import RedisBreakerStore
from proxy.stores.redis_client import RedisOptions, SharedRedis
from proxy.web.keys import UPSTREAMS
from tests.conftest import Gateway, StartGateway
from tests.db import unique
from tests.fakes_faults import FaultyOpenAI
from tests.redis_server import OwnRedis
from tests.test_breaker import Clock, clock
from tests.test_forward import _chat, config, started
from tests.waiting import until

__all__ = ["clock"]  # a fixture, imported for pytest
POLICY = BreakerPolicy(failures=3, cooldown_s=10, max_cooldown_s=60)
Instances = Callable[[str], tuple[Breakers, Breakers]]


@pytest.fixture
async def two_instances(clock: Clock) -> AsyncIterator[Instances]:
    """Two processes' breakers over one Redis URL, each with its own client."""
    clients: list[SharedRedis] = []

    def make(url: str) -> tuple[Breakers, Breakers]:
        pair = []
        for _ in range(2):
            # 2 s, not the production 50 ms: a loaded CI core can stall one reply
            # past 50 ms, which would switch an instance to its per-process
            # fallback; these tests are about sharing, and a killed Redis still
            # fails at once (connection refused).
            redis = SharedRedis(RedisOptions(url, timeout_s=2.0, probe_interval_s=0.05))
            clients.append(redis)
            pair.append(Breakers(RedisBreakerStore(redis, refresh_s=0.0), clock=clock))
        return pair[0], pair[1]

    yield make
    for client in clients:
        await client.close()


async def _synced_health(b: Breakers, key: str) -> str:
    """Health as the instance sees it once its mirror caught up with Redis."""
    store = b.store
    assert isinstance(store, RedisBreakerStore)
    await b.health([key])  # registers the provider with the sync
    await store.sync()
    return (await b.health([key]))[key]


async def test_an_ejection_on_one_instance_reaches_the_other(
    two_instances: Instances, redis_url: str
) -> None:
    one, two = two_instances(redis_url)
    key = f"{unique('p')}/m"
    assert await _synced_health(two, key) == "closed"
    for _ in range(3):
        await one.record(key, POLICY, "failure")
    assert (await one.health([key]))[key] == "open"
    assert await _synced_health(two, key) == "open"


async def test_failures_counted_by_different_instances_add_up(
    two_instances: Instances, redis_url: str
) -> None:
    one, two = two_instances(redis_url)
    key = f"{unique('p')}/m"
    await one.record(key, POLICY, "failure")
    await two.record(key, POLICY, "failure")
    assert await _synced_health(one, key) == "closed"
    await one.record(key, POLICY, "failure")  # the third in a row, fleet-wide
    assert await _synced_health(two, key) == "open"


async def test_one_half_open_probe_across_the_fleet(
    two_instances: Instances, redis_url: str, clock: Clock
) -> None:
    one, two = two_instances(redis_url)
    key = f"{unique('p')}/m"
    for _ in range(3):
        await one.record(key, POLICY, "failure")
    clock.now += 10.5
    seen_one = await _synced_health(one, key)
    seen_two = await _synced_health(two, key)
    assert seen_one == seen_two == "half_open"
    won = await asyncio.gather(
        one.acquire(key, seen_one, lease=5), two.acquire(key, seen_two, lease=5)
    )
    assert sorted(won) == [False, True]  # exactly one instance probes
    prober = one if won[0] else two
    await prober.record(key, POLICY, "ok")
    assert await _synced_health(one, key) == await _synced_health(two, key) == "closed"


async def test_redis_down_breaks_per_process_then_rejoins(
    two_instances: Instances, own_redis: OwnRedis
) -> None:
    one, two = two_instances(own_redis.url)
    key = f"{unique('p')}/m"
    assert await _synced_health(one, key) == "closed"
    own_redis.kill()
    for _ in range(3):  # no Redis: the breaker still works for this process
        await one.record(key, POLICY, "failure")
    assert (await one.health([key]))[key] == "open"
    own_redis.restart()  # empty: it was killed, not saved
    store = one.store
    assert isinstance(store, RedisBreakerStore)
    await until(lambda: store.redis.up, interval=0.05)
    for _ in range(3):
        await two.record(key, POLICY, "failure")
    assert await _synced_health(one, key) == "open"  # the fleet's state, through Redis


async def test_two_gateways_share_an_ejection(
    start_gateway: StartGateway,
    fake_a: FaultyOpenAI,
    fake_b: FaultyOpenAI,
    own_redis: OwnRedis,
) -> None:
    cfg = config(fake_a, fake_b)
    cfg["providers"]["a"]["breaker"] = {"failures": 2, "cooldown_s": 30}
    gws: list[Gateway] = []
    for _ in range(2):
        gws.append(await started(lambda c: start_gateway(c, redis_url=own_redis.url), cfg))
    first, second = gws
    fake_a.force = "error-500"
    for _ in range(2):  # two failures on the first instance eject a for everyone
        status, headers, _ = await _chat(first, "pair")
        assert status == 200 and headers["x-tollway-provider"] == "b"
    assert len(fake_a.seen) == 2
    breakers = second.app[UPSTREAMS].breakers

    async def mirrored() -> bool:  # the second instance's mirror syncs every 0.5 s
        return (await breakers.health(["a/plain"]))["a/plain"] == "open"

    await until(mirrored, interval=0.05)
    for _ in range(3):  # the second instance never tried a itself
        status, headers, _ = await _chat(second, "pair")
        assert status == 200 and headers["x-tollway-attempts"] == "1"
        assert headers["x-tollway-provider"] == "b"
    assert len(fake_a.seen) == 2
