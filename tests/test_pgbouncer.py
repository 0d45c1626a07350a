"""The billing path through a real PgBouncer in transaction pooling mode.

PgBouncer 1.18 (Debian 12) cannot keep prepared statements across
backends, so the gateway is given ``?statement_cache_size=0`` on its
database URL (README "Running at scale"). The pool behind PgBouncer is
smaller than the gateway's, so consecutive transactions of one gateway
connection meet different backends: keys, quota leases, usage batches
and a spool replay all go through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from proxy.stores import accounts, pgdsn
from proxy.web.keys import BILLING
from tests.billing_helpers import USAGE_COUNT, billing_config, wait_for
from tests.conftest import Gateway, StartKeyed
from tests.fakes import FAKE_USAGE, FakeOpenAI
from tests.pgbouncer import PgBouncer
from tests.waiting import until

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture
def bouncer(pg_url: str, tmp_path: Path) -> Iterator[PgBouncer]:
    server = PgBouncer(pg_url, tmp_path / "pgbouncer")
    server.start()
    yield server
    server.stop()


async def _chat(gw: Gateway, key: str, stream: bool = False) -> int:
    body: dict[str, Any] = {"model": "fake-model", "messages": MSG, "stream": stream}
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.base_url + "/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
        ) as r,
    ):
        await r.read()
        return r.status


def test_statement_cache_size_is_taken_off_the_url() -> None:
    url = "postgresql://u:p@127.0.0.1:6432/db?statement_cache_size=0&sslmode=disable"
    assert pgdsn.split(url) == ("postgresql://u:p@127.0.0.1:6432/db?sslmode=disable", 0)
    assert pgdsn.options("postgresql://u@h/db") == {"dsn": "postgresql://u@h/db"}
    with pytest.raises(ValueError, match="statement_cache_size"):
        pgdsn.split("postgresql://h/db?statement_cache_size=lots")


async def test_keys_leases_and_usage_batches_through_pgbouncer(
    start_keyed: StartKeyed,
    fake_openai: FakeOpenAI,
    bouncer: PgBouncer,
    pg: asyncpg.Pool,
) -> None:
    keyed = await start_keyed(
        billing_config(fake_openai.url, lease_requests=2),  # a lease statement every 2 requests
        database_url=bouncer.url,
    )
    gw, tenant, key = keyed.gw, keyed.tenant, keyed.key
    statuses = [await _chat(gw, key["api_key"], stream=i % 3 == 0) for i in range(12)]
    assert statuses == [200] * 12
    await wait_for(pg, USAGE_COUNT, tenant, expect=12)
    counter = await pg.fetchrow(
        "SELECT requests_used, tokens_used FROM quota_counters q"
        " JOIN tenants t ON t.id = q.tenant_id WHERE t.name = $1",
        tenant,
    )
    assert counter["requests_used"] == 12
    assert counter["tokens_used"] == 12 * FAKE_USAGE["total_tokens"]
    async with (
        aiohttp.ClientSession() as s,
        s.get(gw.base_url + "/usage", headers={"Authorization": f"Bearer {key['api_key']}"}) as r,
    ):
        assert r.status == 200
        assert (await r.json())["month"]["requests"]["used"] == 12
    # A revoked key is refused once the key cache (0.5 s) has expired: the
    # lookup went through PgBouncer again, not only the first time.
    await accounts.revoke_key(pg, key["key_id"], "test")
    await until(lambda: _refused(gw, key["api_key"]), limit=10, what="revocation seen")
    assert "login attempt" in bouncer.log()  # the gateway really came through it


async def _refused(gw: Gateway, key: str) -> bool:
    return await _chat(gw, key) == 401


async def test_spool_is_replayed_through_pgbouncer(
    start_keyed: StartKeyed,
    fake_openai: FakeOpenAI,
    bouncer: PgBouncer,
    pg: asyncpg.Pool,
) -> None:
    """PgBouncer goes away (a restart, a failover): usage is spooled to disk
    and written through PgBouncer once it is back, each row once."""
    keyed = await start_keyed(
        billing_config(fake_openai.url, lease_requests=8),
        database_url=bouncer.url,
    )
    gw, tenant, key = keyed.gw, keyed.tenant, keyed.key
    assert [await _chat(gw, key["api_key"]) for _ in range(2)] == [200, 200]
    await wait_for(pg, USAGE_COUNT, tenant, expect=2)
    bouncer.stop()
    # Past the key cache TTL (0.5 s): auth serves its stale entry while the
    # database is unreachable (the time is the behaviour under test).
    await asyncio.sleep(0.6)
    ledger = gw.app[BILLING].ledger
    statuses = [await _chat(gw, key["api_key"]) for _ in range(4)]
    assert statuses == [200] * 4  # the local lease (8) admits them
    await until(lambda: ledger.spool.depth() > 0 and not ledger.healthy, limit=10)
    bouncer.start()  # same port: the gateway's URL does not change
    await wait_for(pg, USAGE_COUNT, tenant, expect=6, limit=15)
    await until(lambda: ledger.spool.depth() == 0 and ledger.healthy, limit=10)
    assert await pg.fetchval(USAGE_COUNT + " AND e.counted", tenant) == 6


async def test_the_setting_is_what_makes_asyncpg_work_through_pgbouncer(
    bouncer: PgBouncer,
) -> None:
    """Why the README asks for it: a statement prepared in one transaction
    is used in a later one that PgBouncer runs on another backend (the first
    is busy in another client's transaction). With asyncpg's statement cache
    that backend has never seen it; with ``statement_cache_size=0`` on the
    URL it works."""

    async def round_trip(url: str) -> None:
        first = await asyncpg.connect(**pgdsn.options(url))
        second = await asyncpg.connect(**pgdsn.options(url))
        try:
            assert await first.fetchval("SELECT $1::int + 1", 1) == 2  # on backend X
            busy = second.transaction()
            await busy.start()  # second now holds X
            await second.fetchval("SELECT 1")
            try:
                assert await first.fetchval("SELECT $1::int + 1", 2) == 3  # on backend Y
            finally:
                await busy.rollback()
        finally:
            await first.close()
            await second.close()

    with pytest.raises(asyncpg.PostgresError, match="prepared statement"):
        await round_trip(bouncer.url.replace("?statement_cache_size=0", ""))
    await round_trip(bouncer.url)
