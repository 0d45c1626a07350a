"""Tollway on a real Redis Cluster (``REDIS_URL=redis+cluster://…``).

The cluster is the bundled ``redis-server`` in cluster mode, 3 masters
(``tests/redis_cluster.py``; once per session). A script or transaction
whose keys span two slots fails on a cluster (client-side or ``CROSSSLOT``),
and any such failure marks Redis down and is counted in ``errors``: so a
gateway that ran every kind of Redis traffic with ``errors == 0`` proves the
hash tags. The failover test starts its own 3 masters + 3 replicas.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from redis.crc import key_slot

from proxy.stores.permits import PermitLeases
from proxy.stores.ratelimit import RateLimiter
from proxy.stores.redis_client import RedisDown, RedisOptions, SharedRedis, open_client
from proxy.stores.redis_url import ClusterUrl, RedisUrlError, cluster_url
from proxy.stores.windows import Limit
from proxy.web.keys import LIMITER, REDIS
from tests import test_breaker_redis as breaker_tests
from tests import test_cache as cache_tests
from tests import test_permits as permits_tests
from tests import test_ratelimit as ratelimit_tests
from tests.billing_helpers import TEST_TIERS, billing_config, tenant_with_key
from tests.conftest import Gateway, StartGateway
from tests.db import unique
from tests.fakes import FakeOpenAI
from tests.fakes_faults import FaultyOpenAI
from tests.redis_cluster import SLOTS, LocalCluster
from tests.test_breaker import Clock, clock
from tests.test_breaker_redis import Instances, two_instances
from tests.waiting import until

__all__ = ["clock", "two_instances"]  # fixtures, imported for pytest
MSG = [{"role": "user", "content": "hi"}]
TIERS: dict[str, Any] = {
    **TEST_TIERS,
    "four": {"requests_per_hour": 4, "monthly_requests": 1000, "max_tokens": 100},
    "five": {"requests_per_hour": 5, "monthly_requests": 1000, "max_tokens": 100},
    "both": {
        "requests_per_hour": 1000,
        "tokens_per_minute": 100_000,
        "monthly_requests": 1000,
        "max_tokens": 100,
    },
}


# --- the URL -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", None),
        ("rediss://user:pw@cache.internal:6380", None),
        ("unix:///run/redis.sock", None),
        (
            "redis+cluster://10.0.0.1:7000,10.0.0.2:7001",
            ClusterUrl((("10.0.0.1", 7000), ("10.0.0.2", 7001))),
        ),
        ("redis+cluster://node-a", ClusterUrl((("node-a", 6379),))),
        (
            "rediss+cluster://app:p%40ss@[::1]:7000,node-b:7001/0",
            ClusterUrl((("::1", 7000), ("node-b", 7001)), "app", "p@ss", tls=True),
        ),
        (  # a plain URL listing several nodes is a cluster too
            "redis://:pw@a:7000,b:7001",
            ClusterUrl((("a", 7000), ("b", 7001)), None, "pw"),
        ),
    ],
)
def test_a_cluster_url_names_its_nodes(url: str, expected: ClusterUrl | None) -> None:
    assert cluster_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://a:7000,b:7001/2", "a Redis Cluster has only database 0, not /2"),
        ("redis+cluster://", "names no node"),
        ("redis+cluster://a:70000", "node 'a:70000' has no valid port"),
        ("redis+cluster://:7000", "node ':7000' has no host"),
    ],
)
def test_a_bad_cluster_url_says_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(RedisUrlError, match=message):
        cluster_url(url)


async def test_a_cluster_nobody_answers_is_redis_down_not_an_error() -> None:
    """No node reachable at discovery: the same fallback as a standalone Redis down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens on it
    redis = SharedRedis(RedisOptions(f"redis+cluster://127.0.0.1:{port}"))
    try:
        assert redis.cluster and not await redis.ping()
        with pytest.raises(RedisDown):
            await redis.call(lambda r: r.get("tw:x"))
        assert redis.errors >= 1 and not redis.up
    finally:
        await redis.close()


# --- exact limits, the cache, breakers: shared through the cluster ---------------


def _master_of(cluster: LocalCluster, key: str) -> int:
    """The master that serves ``key`` as the cluster was assembled."""
    return min(key_slot(key.encode()) // (SLOTS // cluster.masters), cluster.masters - 1)


async def _chat(gw: Gateway, key: str, model: str = "fake-model", **extra: Any) -> int:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.url + "/v1/chat/completions",
            json={"model": model, "messages": MSG, **extra},
            headers={"Authorization": f"Bearer {key}"},
        ) as r,
    ):
        await r.read()
        return r.status


def _healthy(*gws: Gateway) -> None:
    """Every Redis call of these gateways went through: none fell back."""
    for gw in gws:
        redis = gw.app[REDIS]
        assert redis.cluster and redis.up
        assert redis.errors == 0, "a Redis call failed (CROSSSLOT, or a node fault)"
        assert gw.app[LIMITER].fallbacks == 0


async def test_rate_limits_are_exact_across_two_gateways_on_every_master(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    redis_cluster: LocalCluster,
    tmp_path: Path,
) -> None:
    """5 per hour per key, 8 requests alternating between two gateways: 5 pass,
    for keys whose windows live on each of the three masters."""
    cfg = {**billing_config(fake_openai.url), "tiers": TIERS}
    gws = [
        await start_gateway(
            cfg, database_url=pg_url, data_dir=tmp_path, redis_url=redis_cluster.url
        )
        for _ in range(2)
    ]
    by_master: dict[int, str] = {}
    for _ in range(40):  # a key lands on a given master with odds 1/3
        _, key = await tenant_with_key(pg, tmp_path, "five", set(TIERS))
        by_master.setdefault(
            _master_of(redis_cluster, f"tw:rl:{{{key['key_id']}}}"), key["api_key"]
        )
        if len(by_master) == redis_cluster.masters:
            break
    assert sorted(by_master) == [0, 1, 2]
    for api_key in by_master.values():
        statuses = [await _chat(gws[i % 2], api_key) for i in range(8)]
        assert statuses == [200] * 5 + [429] * 3
    _healthy(*gws)


async def test_the_limiter_bound_is_exact_on_the_cluster(redis_cluster: LocalCluster) -> None:
    """test_ratelimit's window-boundary and all-or-nothing tests, on the cluster."""
    redis = SharedRedis(RedisOptions(redis_cluster.url, timeout_s=1.0))
    try:
        limiter = RateLimiter(redis)
        await ratelimit_tests.test_bound_is_exact_across_the_window_boundary(limiter)
        await ratelimit_tests.test_a_request_refused_by_one_limit_consumes_no_other(limiter)
        assert redis.errors == 0 and limiter.fallbacks == 0
    finally:
        await redis.close()


async def test_a_burst_on_fresh_cluster_clients_is_all_shared(redis_cluster: LocalCluster) -> None:
    """test_permits' two workers (12 concurrent clients, leases) on new cluster
    clients: no check may fall back. (Commands sent before the client knew
    the slot map went to random primaries, and the burst of MOVED replies
    made redis-py drop in-flight connections.)"""
    shared = [SharedRedis(RedisOptions(redis_cluster.url, timeout_s=2.0)) for _ in range(2)]
    try:
        workers = [PermitLeases(RateLimiter(r)) for r in shared]
        await permits_tests.test_two_workers_admit_exactly_the_limit(workers, redis_cluster.url)
        assert [r.errors for r in shared] == [0, 0]
    finally:
        for r in shared:
            await r.close()


async def test_a_script_call_across_two_slots_would_be_caught(
    redis_cluster: LocalCluster,
) -> None:
    """The control for the tests above: keys with different hash tags in one
    script call fail on the cluster, and show as a Redis error and a fallback."""
    redis = SharedRedis(RedisOptions(redis_cluster.url, timeout_s=1.0))
    try:
        limiter = RateLimiter(redis)
        split = [
            Limit(f"tw:rl:{{{unique('a')}}}:rph", "requests_per_hour", 5, 3_600_000),
            Limit(f"tw:rl:{{{unique('b')}}}:rph", "requests_per_hour", 5, 3_600_000),
        ]
        assert key_slot(split[0].key.encode()) != key_slot(split[1].key.encode())
        verdict = await limiter.check(split)
        assert verdict.admitted and not verdict.shared  # the per-process fallback
        assert redis.errors == 1 and limiter.fallbacks == 1
    finally:
        await redis.close()


async def test_the_response_cache_is_shared_through_the_cluster(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, redis_cluster: LocalCluster
) -> None:
    await cache_tests.test_second_identical_request_is_a_hit(
        start_gateway, fake_openai, redis_cluster.url
    )
    cfg = {"enabled": True, "ttl_s": 60, "local_ttl_s": 0}
    one, two = [
        await cache_tests._open(start_gateway, fake_openai, redis_cluster.url, **cfg)
        for _ in range(2)
    ]
    body = {"model": "fake-model", "messages": cache_tests._msg(), "temperature": 0}
    assert (await cache_tests._post(one, body))[1]["x-tollway-cache"] == "miss"
    await one.app[REDIS].settled()
    seen = len(fake_openai.seen)
    assert (await cache_tests._post(two, body))[1]["x-tollway-cache"] == "hit"
    assert len(fake_openai.seen) == seen  # the other instance's answer, from the cluster
    _healthy(one, two)


async def test_breakers_are_shared_through_the_cluster(
    two_instances: Instances, redis_cluster: LocalCluster, clock: Clock
) -> None:
    """test_breaker_redis's sharing tests, on the cluster: an ejection reaches
    the other instance, failures add up, one half-open probe fleet-wide."""
    url = redis_cluster.url
    await breaker_tests.test_an_ejection_on_one_instance_reaches_the_other(two_instances, url)
    await breaker_tests.test_failures_counted_by_different_instances_add_up(two_instances, url)
    await breaker_tests.test_one_half_open_probe_across_the_fleet(two_instances, url, clock)


# --- every call site's keys in one slot -----------------------------------------

# What writes to Redis, and the one hash tag each call's keys share:
#   rate-limit script, per-key windows (RPH, TPM)   tw:rl:{key_id}:rph|tpm
#   rate-limit script, provider limits               tw:pl:{provider}:<scope>:rpm|tpm|conc
#   rate-limit script, failed-auth throttle          tw:af:{address}
#   ZREM of a released concurrency slot              tw:pl:{provider}:<scope>:conc
#   breaker compare-and-set script, breaker sync     tw:br:{provider}
#   response cache GET/SET                           tw:cache:{scope}:<sha256>
FAMILIES = {"rl", "pl", "af", "br", "cache"}


async def _families(cluster: LocalCluster) -> set[str]:
    found: set[str] = set()
    for i in range(cluster.masters):
        client = cluster.client(i)
        try:
            async for key in client.scan_iter(match="tw:*", count=1000):
                found.add(key.decode().split(":")[1])
        finally:
            await client.aclose()
    return found


async def test_every_script_and_multi_key_call_stays_in_one_slot(
    start_gateway: StartGateway,
    fake_a: FaultyOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    redis_cluster: LocalCluster,
    tmp_path: Path,
) -> None:
    """A gateway runs every kind of Redis traffic Tollway has against the
    cluster — per-key windows, provider rate and concurrency limits (taken
    and released), the cache, breaker transitions and syncs, the failed-auth
    throttle — and not one call fails."""
    cfg = {**billing_config(fake_a.url), "tiers": TIERS}
    cfg["providers"]["fake"]["breaker"] = {"failures": 2, "cooldown_s": 30}
    cfg["retry"] = {"max_attempts": 1}
    cfg["cache"] = {"enabled": True, "local_ttl_s": 0}
    cfg["ratelimit"] = {
        "providers": {
            "fake": {"rpm": 1000, "tpm": 1_000_000, "max_concurrency": 50},
            "fake/upstream-model": {"rpm": 1000, "max_concurrency": 20},
        },
        "auth_failures": {"max_failures": 2, "window_s": 60},
    }
    gw = await start_gateway(
        cfg, database_url=pg_url, data_dir=tmp_path, redis_url=redis_cluster.url
    )
    _, key = await tenant_with_key(pg, tmp_path, "both", set(TIERS))
    api_key = key["api_key"]
    prompt = {"messages": [{"role": "user", "content": unique("prompt")}], "temperature": 0}
    assert await _chat(gw, api_key, **prompt) == 200  # a miss: stored
    await gw.app[REDIS].settled()
    assert await _chat(gw, api_key, **prompt) == 200  # a hit
    assert await _chat(gw, api_key, stream=True) == 200  # a stream holds a slot
    fake_a.force = "error-500"
    assert [await _chat(gw, api_key) for _ in range(2)] == [502, 502]
    fake_a.force = None
    shared = await _hget(redis_cluster, "tw:br:{fake}", "fake/upstream-model")
    assert orjson.loads(shared)[0] == 2  # both failures, counted in the cluster
    assert [await _chat(gw, "sk-not-a-key") for _ in range(3)] == [401, 401, 429]
    await gw.app[REDIS].settled()  # the slot releases and breaker syncs
    assert FAMILIES <= await _families(redis_cluster)
    _healthy(gw)


async def _hget(cluster: LocalCluster, name: str, field: str) -> bytes:
    client = open_client(RedisOptions(cluster.url, timeout_s=2.0))
    try:
        value = await client.hget(name, field)
    finally:
        await client.aclose()
    assert isinstance(value, bytes), f"{name} {field} not in the cluster"
    return value


# --- a master killed, a replica takes over --------------------------------------


async def test_a_killed_master_fails_over_and_limits_are_shared_again(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    """4 per hour, expected_instances 2. With the key's master killed the
    gateway keeps answering on per-process limits (4 // 2 = 2); once a
    replica took over (bounded by the 1 s node timeout), limits are shared
    and exact again across two gateways."""
    cluster = await LocalCluster(tmp_path / "cluster", replicas=1).start()
    try:
        cfg = {
            **billing_config(fake_openai.url),
            "tiers": TIERS,
            "ratelimit": {"expected_instances": 2},
        }
        gws = [
            await start_gateway(
                cfg,
                database_url=pg_url,
                data_dir=tmp_path,
                redis_url=cluster.url,
                redis_timeout_s=0.2,
            )
            for _ in range(2)
        ]
        _, key = await tenant_with_key(pg, tmp_path, "four", set(TIERS))
        victim = _master_of(cluster, f"tw:rl:{{{key['key_id']}}}")
        assert await _chat(gws[0], key["api_key"]) == 200  # counted in the cluster
        cluster.kill(victim)
        statuses = [await _chat(gws[0], key["api_key"]) for _ in range(3)]
        assert statuses == [200, 200, 429]  # per process: 2 of 4, none failed
        assert await _chat(gws[1], key["api_key"]) == 200  # the other instance's own 2
        for gw in gws:
            assert not gw.app[REDIS].up and gw.app[LIMITER].fallbacks >= 1

        took = await cluster.wait_ok(limit=20)
        survivor = next(i for i in range(cluster.masters) if i != victim)
        slot = key_slot(f"tw:rl:{{{key['key_id']}}}".encode())
        assert await cluster.slot_owner(slot, via=survivor) == victim + cluster.masters
        rejoined = lambda: all(gw.app[REDIS].up for gw in gws)  # noqa: E731
        await until(rejoined, 10, interval=0.05, what="both gateways rejoin the cluster")

        _, fresh = await tenant_with_key(pg, tmp_path, "four", set(TIERS))
        statuses = [await _chat(gws[i % 2], fresh["api_key"]) for i in range(6)]
        assert statuses == [200] * 4 + [429] * 2, f"failover took {took:.1f}s"
    finally:
        cluster.stop()
