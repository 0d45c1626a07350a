"""The quota book under concurrency, against a real Postgres."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from proxy.config.tiers import BillingPolicy, Tier
from proxy.core.principal import Principal
from proxy.stores.quota import QuotaBook
from tests.billing_helpers import TEST_TIERS, billing_config, tenant_with_key, wait_for
from tests.conftest import Gateway, StartGateway
from tests.fakes import FAKE_USAGE, FakeOpenAI
from tests.waiting import until

ROOMY = Tier("roomy", None, None, 1_000_000_000, 1_000_000_000_000, 4096)


async def test_plenty_left_is_never_refused_while_leases_churn(
    pg: asyncpg.Pool, tmp_path: Path
) -> None:
    """Requests admitted while a refill waits on Postgres may use up the
    lease; the refill must then ask again, not call the quota exhausted."""
    tenant, _ = await tenant_with_key(pg, tmp_path, "pro")
    tenant_id = await pg.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    who = Principal("key_q", "tw-q", tenant_id, tenant, "roomy", None)
    # Small blocks: a refill every few requests, so refills and admissions interleave.
    book = QuotaBook(pg, "w-churn", BillingPolicy(lease_requests=3, lease_tokens=9_000))
    rng = random.Random(7)
    refused: list[str] = []

    async def client() -> None:
        for _ in range(150):
            try:
                r = await book.admit(who, ROOMY, 4_000)
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                refused.append(str(exc))
                continue
            await asyncio.sleep(rng.random() / 1000)  # the behaviour: holds of varied length
            book.release(r, counted=True, tokens_used=20)

    await asyncio.gather(*(client() for _ in range(16)))
    assert refused == []
    assert book.lease_calls > 100  # the blocks really did churn


ADMIN = "admin-quota-3c9e"
TIER_CHANGE = {
    **TEST_TIERS,
    # a request limit but no token limit: leases hold requests, no tokens
    "requests-only": {"requests_per_hour": 10_000, "monthly_requests": 10_000, "max_tokens": 50},
    "capped": {
        "requests_per_hour": 10_000,
        "monthly_requests": 10_000,
        "monthly_tokens": 600,
        "max_tokens": 50,
    },
}
USED = (
    "SELECT coalesce(sum(c.tokens_used), 0) FROM quota_counters c"
    " JOIN tenants t ON t.id = c.tenant_id WHERE t.name = $1"
)
LEASES = (
    "SELECT coalesce(min(l.tokens), 0) FROM quota_leases l"
    " JOIN tenants t ON t.id = l.tenant_id WHERE t.name = $1"
)


async def _send(gw: Gateway, method: str, path: str, key: str, body: Any) -> int:
    async with (
        aiohttp.ClientSession() as s,
        s.request(
            method, gw.url + path, json=body, headers={"Authorization": f"Bearer {key}"}
        ) as r,
    ):
        await r.read()
        return r.status


async def _tier_seen(gw: Gateway, key: str, tier: str) -> None:
    async def seen() -> bool:
        headers = {"Authorization": f"Bearer {key}"}
        async with (
            aiohttp.ClientSession() as s,
            s.get(gw.base_url + "/usage", headers=headers) as r,
        ):
            return bool((await r.json())["tier"] == tier)

    await until(seen, interval=0.05, what=f"tier {tier!r} seen")


async def test_a_tier_change_mid_month_counts_the_usage_before_it(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOLLWAY_ADMIN_KEY", ADMIN)
    cfg = {**billing_config(fake_openai.url), "tiers": TIER_CHANGE}
    gw = await start_gateway(cfg, database_url=pg_url, data_dir=tmp_path)
    tenant, key = await tenant_with_key(pg, tmp_path, "requests-only", set(TIER_CHANGE))
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    before = 30  # 30 * 17 = 510 of the new tier's 600 tokens
    for _ in range(before):
        assert await _send(gw, "POST", "/v1/chat/completions", key["api_key"], chat) == 200
    used = before * FAKE_USAGE["total_tokens"]
    await wait_for(pg, USED, tenant, expect=used)
    assert await pg.fetchval(LEASES, tenant) >= 0  # a lease never goes negative
    path = f"/admin/tenants/{tenant}"
    assert await _send(gw, "PATCH", path, ADMIN, {"tier": "capped"}) == 200
    await _tier_seen(gw, key["api_key"], "capped")  # the key cache expired (0.5 s)
    # 90 tokens are left; a request reserves its prompt + 50 tokens, so at
    # most two more fit before the month's 600 are used up.
    statuses = []
    for _ in range(10):
        statuses.append(await _send(gw, "POST", "/v1/chat/completions", key["api_key"], chat))
    assert statuses.count(200) <= 2 and statuses[-1] == 429, statuses
    await wait_for(pg, USED, tenant, expect=used + statuses.count(200) * 17)
    assert await pg.fetchval(USED, tenant) <= 600
    assert await pg.fetchval(LEASES, tenant) >= 0


async def test_a_negative_lease_left_by_an_older_worker_gives_no_headroom(
    pg: asyncpg.Pool, tmp_path: Path
) -> None:
    """A worker still on the old settle code during an upgrade may write a
    negative lease; taking a lease must not count it as room."""
    tenant, _ = await tenant_with_key(pg, tmp_path, "pro")
    tenant_id = await pg.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    period = await pg.fetchval("SELECT date_trunc('month', now())::date")
    await pg.execute(
        "INSERT INTO quota_counters (tenant_id, period, requests_used, tokens_used)"
        " VALUES ($1, $2, 10, 500)",
        tenant_id,
        period,
    )
    await pg.execute(
        "INSERT INTO quota_leases (worker_id, tenant_id, period, requests, tokens)"
        " VALUES ('old-worker', $1, $2, -10, -500)",
        tenant_id,
        period,
    )
    row = await pg.fetchrow(
        "SELECT * FROM tollway_take_lease('new-worker', $1, $2, 0, 1000, 1, 100, 600)",
        tenant_id,
        period,
    )
    assert row["got_tokens"] == 12 and row["left_tokens"] == 88  # 600 - 500 used, 1/8 granted
