"""The shared limiter against a real Redis: the exact bound, atomicity, the
per-process fallback, and per-key limits through the gateway (one process
and two)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml

from proxy.config.model import ConfigError
from proxy.pipeline.registry import parse_config
from proxy.stores.local_limits import LocalLimiter
from proxy.stores.ratelimit import RateLimiter
from proxy.stores.redis_client import RedisOptions, SharedRedis, open_client
from proxy.stores.windows import Limit
from tests.billing_helpers import TEST_TIERS, billing_config, tenant_with_key, wait_for
from tests.conftest import Gateway, StartGateway
from tests.db import unique
from tests.fakes import FakeOpenAI
from tests.waiting import until

ROOT = Path(__file__).parents[1]
MSG = [{"role": "user", "content": "hi"}]
TIERS: dict[str, Any] = {
    **TEST_TIERS,
    "two": {
        "requests_per_hour": 2,
        "monthly_requests": 1000,
        "monthly_tokens": 1_000_000,
        "max_tokens": 100,
    },
    "five": {"requests_per_hour": 5, "monthly_requests": 1000, "max_tokens": 100},
    # each request reserves prompt (~8) + max_tokens (100) tokens of the minute
    "tpm": {"requests_per_hour": 10, "tokens_per_minute": 300, "max_tokens": 100},
}


@pytest.fixture
async def limiter(redis_url: str) -> AsyncIterator[RateLimiter]:
    redis = SharedRedis(RedisOptions(redis_url))
    yield RateLimiter(redis)
    await redis.close()


def _key() -> str:
    return f"tw:test:{{{unique('k')}}}"


async def test_bound_is_exact_across_the_window_boundary(limiter: RateLimiter) -> None:
    """N per window W: no closed interval of length W ever holds N + 1, the
    bound is reached, and a refusal's retry time is never early."""
    cap, window = 5, 600  # 1 ms slots
    lim = Limit(_key(), "requests_per_hour", cap, window)
    admitted: list[int] = []
    refusals: list[tuple[int, int]] = []
    deadline = None
    while deadline is None or time.monotonic() < deadline:
        v = await limiter.check([lim])
        if deadline is None:
            # 2.7 windows from the first answer (three windows' admissions,
            # not four): a slow first call (a new connection, a cluster's
            # slot map, a loaded machine) must not eat into them.
            deadline = time.monotonic() + 2.7 * window / 1000
        if v.admitted:
            admitted.append(v.now_ms)
        else:
            refusals.append((v.now_ms, v.windows[0].retry_ms))
    busiest = max(sum(1 for u in admitted if t - window <= u <= t) for t in admitted)
    assert busiest == cap
    for at, retry in refusals:
        assert retry > 0
        assert not any(at < t < at + retry for t in admitted), "admitted before retry-after"
    # Forgetting lags by at most one slot: once the first unit's slot has left
    # the window, no check is refused (measured on Redis's clock, so however
    # slowly this loop runs).
    first, second = admitted[0], admitted[cap]
    assert second - first >= window
    assert all(at <= first + window for at, _ in refusals if at < second)
    assert len(admitted) == 3 * cap


async def test_a_request_refused_by_one_limit_consumes_no_other(limiter: RateLimiter) -> None:
    tag = _key()

    def limits(tokens: int) -> list[Limit]:
        return [
            Limit(f"{tag}:r", "requests_per_hour", 3, 60_000),
            Limit(f"{tag}:t", "tokens_per_minute", 100, 60_000, tokens),
        ]

    assert (await limiter.check(limits(60))).admitted
    refused = await limiter.check(limits(60))
    assert not refused.admitted
    assert refused.blocking is not None and refused.blocking.limit.name == "tokens_per_minute"
    peek = await limiter.check(limits(0), commit=False)
    assert [w.used for w in peek.windows] == [1, 60]  # the refused request took nothing
    assert (await limiter.check(limits(40))).admitted
    assert (await limiter.check(limits(0))).admitted  # 3 of 3 requests now
    full = await limiter.check(limits(0))
    assert not full.admitted and full.blocking is not None
    assert full.blocking.limit.name == "requests_per_hour"
    huge = await limiter.check([Limit(f"{tag}:t2", "tokens_per_minute", 100, 60_000, 101)])
    assert huge.windows[0].retry_ms == -1  # can never fit


def test_fallback_divides_the_limit_by_expected_instances() -> None:
    now = [1000.0]
    local = LocalLimiter(clock=lambda: now[0])
    lim = Limit("k", "requests_per_hour", 10, 60_000)
    results = [local.check([lim], instances=3).admitted for _ in range(5)]
    assert results == [True, True, True, False, False]  # 10 // 3
    refused = local.check([lim], instances=3)
    assert refused.windows[0].retry_ms == 60_100  # one window and one 100 ms slot
    now[0] += 60.0
    assert not local.check([lim], instances=3).admitted
    now[0] += 0.1
    assert local.check([lim], instances=3).admitted
    assert local.check([Limit("k2", "requests_per_hour", 2, 60_000)], instances=8).admitted


async def _chat(gw_url: str, key: str, **extra: Any) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw_url + "/v1/chat/completions",
            json={"model": "fake-model", "messages": MSG, **extra},
            headers={"Authorization": f"Bearer {key}"},
        ) as r,
    ):
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.json()


async def _usage(gw: Gateway, key: str) -> Any:
    async with (
        aiohttp.ClientSession() as s,
        s.get(gw.url + "/v1/usage", headers={"Authorization": f"Bearer {key}"}) as r,
    ):
        return await r.json()


async def _gateway(
    start_gateway: StartGateway, fake: FakeOpenAI, pg_url: str, redis_url: str, tmp_path: Path
) -> Gateway:
    return await start_gateway(
        {**billing_config(fake.url), "tiers": TIERS},
        database_url=pg_url,
        data_dir=tmp_path,
        redis_url=redis_url,
    )


HOUR_SLOT_MS = 3_600_000 // 600


async def _redis_ms(redis_url: str) -> int:
    """The limiter's clock: the Redis server's ``TIME``, in ms (a cluster's
    nodes here share the machine's clock)."""
    client = open_client(RedisOptions(redis_url, timeout_s=2.0))
    try:
        sec, usec = await client.time()
    finally:
        await client.aclose()
    return int(sec) * 1000 + int(usec) // 1000


async def _early_in_slot(redis_url: str, slot_ms: int) -> int:
    """Wait (bounded) until the Redis clock is in the first half of a slot."""
    now: list[int] = [0]

    async def early() -> bool:
        now[0] = await _redis_ms(redis_url)
        return now[0] % slot_ms < slot_ms // 2

    await until(early, limit=slot_ms / 1000, interval=0.1)
    return now[0]


async def test_hourly_limit_429_is_retryable_and_costs_no_quota(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    redis_url: str,
    tmp_path: Path,
) -> None:
    gw = await _gateway(start_gateway, fake_openai, pg_url, redis_url, tmp_path)
    tenant, key = await tenant_with_key(pg, tmp_path, "two", set(TIERS))
    # The exact reset times below hold while all three requests fall in one
    # 6 s slot of the hour; start early in a slot so a slow machine does not
    # straddle a slot edge (then the oldest slot leaves up to 6 s sooner).
    started = await _early_in_slot(redis_url, HOUR_SLOT_MS)
    statuses = []
    for _ in range(2):
        status, headers, _ = await _chat(gw.url, key["api_key"])
        statuses.append((status, headers["x-ratelimit-remaining-requests"]))
    assert statuses == [(200, "1"), (200, "0")]
    assert headers["x-ratelimit-limit-requests"] == "2"
    # the oldest request leaves the window 1h0m0s to 1h0m6s (one 6 s slot) after it came
    assert headers["x-ratelimit-reset-requests"] in {f"1h0m{s}s" for s in range(1, 7)}
    status, headers, body = await _chat(gw.url, key["api_key"])
    assert status == 429
    prefix = key["api_key"][:10]
    assert body["error"]["message"].startswith(
        f"Rate limit reached for key {prefix}... on requests per hour (RPH): "
        "Limit 2, Used 2, Requested 1. Please try again in 1h0m"
    )
    assert {k: v for k, v in body["error"].items() if k != "message"} == {
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert 3600 < int(headers["retry-after"]) <= 3606
    assert await _redis_ms(redis_url) // HOUR_SLOT_MS == started // HOUR_SLOT_MS, "slot edge"
    assert "x-should-retry" not in headers  # an hourly 429 is worth retrying later
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-limit-tokens"] == "1000000"  # monthly tokens: tier has no TPM
    usage = await _usage(gw, key["api_key"])
    assert usage["hour"]["requests"] == {"used": 2, "limit": 2, "remaining": 0}
    assert usage["hour"]["resets_at"].endswith("Z")
    # The refused request settled as a 429 and gave its monthly reservation back.
    counted = "SELECT requests_used FROM quota_counters c JOIN tenants t ON t.id = c.tenant_id"
    await wait_for(pg, counted + " WHERE t.name = $1", tenant, expect=2)


async def test_tokens_per_minute_refusal_takes_no_hourly_request(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    redis_url: str,
    tmp_path: Path,
) -> None:
    gw = await _gateway(start_gateway, fake_openai, pg_url, redis_url, tmp_path)
    _, key = await tenant_with_key(pg, tmp_path, "tpm", set(TIERS))
    results = [await _chat(gw.url, key["api_key"]) for _ in range(3)]
    assert [r[0] for r in results] == [200, 200, 429]
    _, headers, body = results[2]
    assert body["error"]["type"] == "tokens" and "tokens per min (TPM)" in body["error"]["message"]
    assert headers["x-ratelimit-limit-tokens"] == "300"  # the minute window, not the month
    assert 0 < int(headers["retry-after"]) <= 61
    usage = await _usage(gw, key["api_key"])
    assert usage["hour"]["requests"]["used"] == 2  # the TPM refusal took no request


async def test_two_tollway_processes_share_one_limit(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    redis_url: str,
    tmp_path: Path,
) -> None:
    """5 per hour across an in-test gateway and a `tollway serve` process: 5, not 10."""
    here = await _gateway(start_gateway, fake_openai, pg_url, redis_url, tmp_path)
    _, key = await tenant_with_key(pg, tmp_path, "five", set(TIERS))
    config = tmp_path / "tollway.yaml"
    config.write_text(yaml.safe_dump({**billing_config(fake_openai.url), "tiers": TIERS}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DATABASE_URL": pg_url, "REDIS_URL": redis_url}
    env["TOLLWAY_DATA_DIR"] = str(tmp_path)  # the same key secret as `here`
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
        urls = [here.url, f"http://127.0.0.1:{port}"]
        statuses = [(await _chat(urls[i % 2], key["api_key"]))[0] for i in range(12)]
    finally:
        proc.terminate()
        await proc.wait()
    assert statuses.count(200) == 5 and statuses.count(429) == 7
    assert statuses[:5] == [200] * 5


@pytest.mark.parametrize(
    ("ratelimit", "message"),
    [
        ({"instances": 2}, "ratelimit.instances: unknown key"),
        ({"expected_instances": 0}, "ratelimit.expected_instances: must be a positive integer"),
        ({"providers": {"nope": {"rpm": 1}}}, "ratelimit.providers.nope: unknown provider 'nope'"),
        ({"providers": {"fake/m": {"rps": 1}}}, "ratelimit.providers.fake/m.rps: unknown key"),
        ({"providers": {"fake": {"tpm": 1.5}}}, "ratelimit.providers.fake.tpm: must be a positive"),
    ],
)
def test_ratelimit_config_errors_name_the_key_path(ratelimit: dict[str, Any], message: str) -> None:
    cfg = {**billing_config("http://127.0.0.1:1/v1"), "ratelimit": ratelimit}
    with pytest.raises(ConfigError) as err:
        parse_config(yaml.safe_dump(cfg), {})
    assert str(err.value).startswith(message)
