"""Billing survives outages, crashes and month ends: nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from proxy.config.tiers import BillingPolicy
from proxy.core.principal import Principal
from proxy.stores.embedded import EmbeddedPostgres
from proxy.stores.ledger import Ledger, Spool, UsageRow
from proxy.stores.quota import QuotaBook
from proxy.web.keys import BILLING
from tests.billing_helpers import TEST_TIERS, billing_config, tenant_with_key, wait_for
from tests.conftest import Gateway, StartGateway
from tests.db import unique
from tests.fakes import FAKE_USAGE, FakeOpenAI
from tests.usage_rows import usage_row
from tests.waiting import until

MSG = [{"role": "user", "content": "hi"}]


async def _chat(gw: Gateway, key: str, model: str = "fake-model") -> int:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.base_url + "/chat/completions",
            json={"model": model, "messages": MSG},
            headers={"Authorization": f"Bearer {key}"},
        ) as r,
    ):
        await r.read()
        return r.status


async def _ready(gw: Gateway) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/readyz") as r:
        body = await r.json()
        return r.status, body["status"], body["database"]


async def test_outage_spools_usage_and_reconciles(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    own_db: tuple[str, EmbeddedPostgres],
    tmp_path: Path,
) -> None:
    url, server = own_db
    cfg = billing_config(fake_openai.url, lease_requests=8)
    # 64 requests a month: the first block is 8 (1/8 of what is left) and,
    # that near the limit, nothing is leased ahead in the background
    # (quota.FAR_BLOCKS): the lease of 8 is all the worker holds when
    # Postgres goes.
    cfg["tiers"] = {**cfg["tiers"], "outage": {**TEST_TIERS["pro"], "monthly_requests": 64}}
    gw = await start_gateway(cfg, database_url=url, data_dir=tmp_path)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    assert pool is not None
    tenant, key = await tenant_with_key(pool, tmp_path, "outage", set(cfg["tiers"]))
    await pool.close()
    statuses = [await _chat(gw, key["api_key"]) for _ in range(5)]  # leases 8 requests
    server.stop()  # the database goes away mid-run
    # Time itself is the condition: past the key cache TTL (0.5 s), auth must
    # use its stale entry (a sleep lasts at least this long, however loaded).
    await asyncio.sleep(0.6)
    statuses += [await _chat(gw, key["api_key"]) for _ in range(6)]
    assert statuses == [200] * 8 + [503] * 3  # the local lease serves 3 more, then fail closed
    assert await _ready(gw) == (503, "unready", "unreachable")  # load balancers: look elsewhere
    ledger = gw.app[BILLING].ledger
    await until(lambda: ledger.spool.depth() > 0 and not ledger.healthy)
    server.start()  # the database comes back; the spool is replayed
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    assert pool is not None
    try:
        served = statuses.count(200)
        await wait_for(
            pool, "SELECT count(*) FROM usage_events WHERE counted", expect=served, limit=10
        )
        tokens = await pool.fetchval(
            "SELECT sum(prompt_tokens + completion_tokens) FROM usage_events WHERE counted"
        )
        assert tokens == served * FAKE_USAGE["total_tokens"]  # what the provider reported
        counter = await pool.fetchrow("SELECT requests_used, tokens_used FROM quota_counters")
        assert (counter["requests_used"], counter["tokens_used"]) == (served, tokens)
        # The refused requests' rows come out of the same spool, in their own batch.
        await wait_for(pool, "SELECT count(*) FROM usage_events WHERE status = 503", expect=3)
        await wait_for(pool, "SELECT 1", expect=1)
        assert ledger.spool.depth() == 0 and ledger.healthy
        assert await _ready(gw) == (200, "ready", "up")
    finally:
        await pool.close()
    assert tenant


async def test_crashed_worker_leases_are_released_by_the_sweeper(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    tenant, key = await tenant_with_key(pg, tmp_path, "tiny")  # 10 requests a month
    tenant_id = await pg.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    from proxy.config.tiers import parse_tiers

    tiny = parse_tiers(TEST_TIERS)["tiny"]
    dead = QuotaBook(pg, "crashed-worker", BillingPolicy())
    who = Principal("key_dead", "tw-dead", tenant_id, tenant, "tiny", None)
    for _ in range(6):  # admitted, never settled: the worker "crashes" here
        await dead.admit(who, tiny, 0)
    held = await pg.fetchval(
        "SELECT requests FROM quota_leases WHERE worker_id = $1", "crashed-worker"
    )
    assert held >= 6
    gw = await start_gateway(
        billing_config(fake_openai.url, lease_ttl_s=0.4), database_url=pg_url, data_dir=tmp_path
    )
    await wait_for(
        pg, "SELECT count(*) FROM quota_leases WHERE worker_id = $1", "crashed-worker", expect=0
    )
    # the released reservations are usable again: all 10 requests of the month
    statuses = [await _chat(gw, key["api_key"], "echo") for _ in range(11)]
    assert statuses == [200] * 10 + [429]


async def test_month_rollover_resets_the_quota(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    now = [datetime(2026, 11, 30, 23, 59, 58, tzinfo=UTC)]
    gw = await start_gateway(
        billing_config(fake_openai.url),
        database_url=pg_url,
        data_dir=tmp_path,
        clock=lambda: now[0],
    )
    tenant, key = await tenant_with_key(pg, tmp_path, "tiny")
    november = [await _chat(gw, key["api_key"], "echo") for _ in range(11)]
    assert november == [200] * 10 + [429]
    now[0] = datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC)
    assert await _chat(gw, key["api_key"], "echo") == 200
    rows = await wait_for(
        pg,
        "SELECT count(*) FROM quota_counters c JOIN tenants t ON t.id = c.tenant_id"
        " WHERE t.name = $1 AND c.requests_used > 0",
        tenant,
        expect=2,
    )
    assert rows == 2
    periods = await pg.fetch(
        "SELECT c.period, c.requests_used FROM quota_counters c"
        " JOIN tenants t ON t.id = c.tenant_id WHERE t.name = $1 ORDER BY c.period",
        tenant,
    )
    assert [(str(p["period"]), p["requests_used"]) for p in periods] == [
        ("2026-11-01", 10),
        ("2026-12-01", 1),
    ]


async def test_a_flush_cancelled_mid_write_loses_no_row(pg: asyncpg.Pool, tmp_path: Path) -> None:
    """A cancel landing while a batch is in Postgres (the shutdown used to
    cancel the flusher) puts the batch back; the next flush writes it once."""
    ledger = Ledger(pg, Spool(tmp_path / "spool.jsonl"), "w-cancel", 60, 30)
    marker = unique("cancel")
    for i in range(3):
        ledger.add(_row(f"{marker}-{i}"))
    async with pg.acquire() as blocker, blocker.transaction():
        await blocker.execute("LOCK TABLE usage_events IN ACCESS EXCLUSIVE MODE")
        flushing = asyncio.ensure_future(ledger.flush())  # noqa: TID251 - awaited below
        await until(lambda: _waits_on_lock(pg), what="the INSERT waiting on the lock")
        assert ledger.pending() == 3 and not flushing.done()
        flushing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flushing
    assert ledger.pending() == 3  # back in the queue, not dropped
    await ledger.close()
    count = "SELECT count(*) FROM usage_events WHERE request_id LIKE $1"
    assert await pg.fetchval(count, marker + "-%") == 3
    assert ledger.spool.depth() == 0


async def _waits_on_lock(pool: asyncpg.Pool) -> bool:
    """Whether a session waits for a lock on ``usage_events`` (the flush's INSERT)."""
    query = (
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'usage_events'::regclass"
    )
    return bool(await pool.fetchval(query))


def _row(request_id: str) -> UsageRow:
    values: dict[str, object] = {
        "period": datetime.now(UTC).date().replace(day=1),
        "event_id": request_id,
        "request_id": request_id,
        "endpoint": "chat",
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "usage_source": "provider",
        "counted": False,
        "cached": False,
        "stream": False,
        "client_disconnected": False,
        "status": 200,
        "attempts": 1,
        "cost_usd": Decimal(0),
    }
    return usage_row(values, leased=False)
