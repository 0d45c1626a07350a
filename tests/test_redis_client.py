"""Redis faults never fail a request: killed and restarted, paused (slow),
flushed; and the embedded Redis of `tollway serve` starts and stops with it."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml
from redis.asyncio import Redis

from proxy.web.keys import LIMITER, REDIS
from tests.billing_helpers import TEST_TIERS, billing_config, tenant_with_key, wait_for
from tests.conftest import Gateway, StartGateway
from tests.db import unique
from tests.fakes import FakeOpenAI
from tests.redis_server import OwnRedis
from tests.test_metrics import parse, scrape, value
from tests.waiting import until

ROOT = Path(__file__).parents[1]
TIERS: dict[str, Any] = {
    **TEST_TIERS,
    "four": {"requests_per_hour": 4, "monthly_requests": 1000, "max_tokens": 100},
}


def _config(fake: FakeOpenAI) -> dict[str, Any]:
    return {
        **billing_config(fake.url),
        "tiers": TIERS,
        "ratelimit": {"expected_instances": 2},  # the fallback admits 4 // 2 per process
        "cache": {"enabled": True, "local_ttl_s": 0},  # every lookup goes to Redis
    }


async def _setup(
    start_gateway: StartGateway,
    fake: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    redis: OwnRedis,
    tmp_path: Path,
    tier: str = "four",
) -> tuple[Gateway, str, str]:
    gw = await start_gateway(
        _config(fake),
        database_url=pg_url,
        data_dir=tmp_path,
        redis_url=redis.url,
        redis_timeout_s=0.05,  # the production timeout: these tests are about Redis faults
    )
    tenant, key = await tenant_with_key(pg, tmp_path, tier, set(TIERS))
    return gw, tenant, key["api_key"]


async def _chat(gw: Gateway, key: str, body: dict[str, Any]) -> tuple[int, dict[str, str], float]:
    started = time.perf_counter()
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.base_url + "/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
        ) as r,
    ):
        await r.read()
        return r.status, {k.lower(): v for k, v in r.headers.items()}, time.perf_counter() - started


def _body() -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": unique("p")}]} | {
        "temperature": 0
    }


async def _cached(url: str) -> bool:
    """Whether a reply is in this test's Redis (kept in the background after
    the response went out)."""
    async with Redis.from_url(url) as direct:
        return bool(await direct.keys("tw:cache:*"))


async def test_redis_killed_mid_run_then_restarted(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    own_redis: OwnRedis,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "tollway.redis")
    gw, tenant, key = await _setup(start_gateway, fake_openai, pg_url, pg, own_redis, tmp_path)
    body = _body()
    status, headers, _ = await _chat(gw, key, body)
    assert (status, headers["x-tollway-cache"], headers["x-ratelimit-remaining-requests"]) == (
        200,
        "miss",
        "3",
    )
    await until(lambda: _cached(own_redis.url))
    assert (await _chat(gw, key, body))[1]["x-tollway-cache"] == "hit"

    own_redis.kill()
    seen = []
    for _ in range(3):
        status, headers, took = await _chat(gw, key, body)
        seen.append((status, headers.get("x-tollway-cache"), took < 1.0))  # no reconnect wait
    # The cache is a miss (served by the provider), the fallback admits 4 // 2.
    assert seen == [(200, "miss", True), (200, "miss", True), (429, None, True)]
    assert headers["x-ratelimit-limit-requests"] == "2" and int(headers["retry-after"]) > 0
    redis = gw.app[REDIS]
    assert not redis.up and redis.outages == 1 and redis.errors >= 1
    assert gw.app[LIMITER].fallbacks >= 3
    assert "redis unreachable" in caplog.text
    _, series = parse(await scrape(gw))
    assert value(series, "tollway_redis_up") == 0
    assert value(series, "tollway_redis_errors_total") >= 1
    assert value(series, "tollway_ratelimit_local_checks_total") >= 3
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/readyz") as r:
        ready = await r.json()
    assert r.status == 200 and ready["redis"] == "down"  # degraded, still serving

    own_redis.restart()  # empty: Redis keeps nothing across a restart here
    await until(lambda: redis.up, 3.0)
    status, headers, _ = await _chat(gw, key, body)
    assert (status, headers["x-ratelimit-remaining-requests"]) == (200, "3")
    assert headers["x-tollway-cache"] == "miss"
    assert "redis is back" in caplog.text
    assert value(parse(await scrape(gw))[1], "tollway_redis_up") == 1
    async with Redis.from_url(own_redis.url) as direct:
        assert await direct.keys("tw:rl:*")  # the window is in Redis again
    # Monthly quota stayed exact in Postgres throughout: 5 served, the 429 refunded.
    used = "SELECT requests_used FROM quota_counters c JOIN tenants t ON t.id = c.tenant_id"
    await wait_for(pg, used + " WHERE t.name = $1", tenant, expect=5)


async def test_slow_redis_costs_one_timeout_not_a_failure(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    own_redis: OwnRedis,
    tmp_path: Path,
) -> None:
    # "pro": a window far from its limit. With "four" the fallback admits 2,
    # and on a loaded machine the first request's own Redis call could time
    # out (50 ms) and take one of them, so the third request's 429 would be
    # right and this test would fail for a reason it is not about.
    gw, _, key = await _setup(start_gateway, fake_openai, pg_url, pg, own_redis, tmp_path, "pro")
    assert (await _chat(gw, key, _body()))[0] == 200
    async with Redis.from_url(own_redis.url) as direct:
        await direct.client_pause(2000, all=True)  # every command waits two seconds
        status, headers, took = await _chat(gw, key, _body())
        assert status == 200 and headers["x-tollway-cache"] == "miss"
        assert took < 1.5  # one 50 ms socket timeout, then the fallback (not the 2 s pause)
        assert not gw.app[REDIS].up  # marked down: the next request does not try Redis
        status, _, took = await _chat(gw, key, _body())
        assert status == 200 and took < 1.5
        await until(lambda: gw.app[REDIS].up, 5.0)


async def test_flushall_and_script_flush_mid_run(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    own_redis: OwnRedis,
    tmp_path: Path,
) -> None:
    gw, _, key = await _setup(start_gateway, fake_openai, pg_url, pg, own_redis, tmp_path)
    body = _body()
    await _chat(gw, key, body)
    await until(lambda: _cached(own_redis.url))
    status, headers, _ = await _chat(gw, key, body)
    assert (headers["x-tollway-cache"], headers["x-ratelimit-remaining-requests"]) == ("hit", "2")
    async with Redis.from_url(own_redis.url) as direct:
        await direct.flushall()
        await direct.script_flush()
    status, headers, _ = await _chat(gw, key, body)
    # EVALSHA failed with NOSCRIPT and was loaded again; the windows start over.
    assert (status, headers["x-tollway-cache"]) == (200, "miss")
    assert headers["x-ratelimit-remaining-requests"] == "3"
    assert gw.app[REDIS].up and gw.app[REDIS].errors == 0


def _redis_children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return [c for c in out if b"redis-server" in Path(f"/proc/{c}/cmdline").read_bytes()]


async def test_serve_starts_and_stops_its_embedded_redis(
    fake_openai: FakeOpenAI, pg_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "tollway.yaml"
    config.write_text(yaml.safe_dump(billing_config(fake_openai.url)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env |= {"DATABASE_URL": pg_url, "TOLLWAY_DATA_DIR": str(tmp_path)}
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port)),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            line = b""
            while b"listening on" not in line:
                line = await proc.stdout.readline()
                assert line, "tollway serve exited"
        redis = _redis_children(proc.pid)
        assert len(redis) == 1
    finally:
        proc.terminate()
        await proc.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(redis[0], 0)
