"""A usage batch costs the ledger one round trip to Postgres, and bills as before."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import asyncpg

from proxy.stores import migrate, usage_batch
from proxy.stores.ledger import Ledger, Spool, UsageRow
from proxy.web.billing_setup import BillingOptions, open_pool
from tests.billing_helpers import tenant_with_key
from tests.db import unique
from tests.usage_rows import usage_row


def _words(text: str) -> str:
    return " ".join(text.split())


def test_the_batch_function_runs_the_ledgers_own_statement() -> None:
    """``tollway_write_usage`` (a migration, fixed once applied; the latest
    that replaces it) holds the statement ``usage_batch`` makes from its
    columns: a row that gains a column without a migration replacing the
    function fails here, not in production."""
    defining = "FUNCTION tollway_write_usage"
    path = [p for _, p in migrate.available() if defining in p.read_text()][-1]
    assert path.name == "0013_usage_write_fine.sql"
    function = _words(path.read_text())
    ctes, final = usage_batch._WRITE.strip().rsplit("\n)\nSELECT 'q'", 1)
    assert _words(ctes.replace("$1::jsonb", "p_batch")) in function
    assert _words("SELECT 'q'" + final) in function


def _row(tenant_id: int, key_id: str, request_id: str) -> UsageRow:
    values = {
        "period": datetime.now(UTC).date().replace(day=1),
        "event_id": request_id,
        "request_id": request_id,
        "tenant_id": tenant_id,
        "key_id": key_id,
        "worker_id": "w-trips",
        "endpoint": "chat",
        "public_model": "fake-model",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "usage_source": "provider",
        "counted": True,
        "cached": False,
        "stream": False,
        "client_disconnected": False,
        "status": 200,
        "attempts": 1,
        "cost_usd": Decimal("0.25"),
    }
    return usage_row(values, leased=True)


async def test_a_batch_is_one_statement_and_moves_counters_leases_and_keys(
    pg_url: str, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    """Through the gateway's own pool (no reset query on release): the
    statements a flush sends, each a round trip, are just the one call."""
    sent: list[str] = []
    pool = await open_pool(BillingOptions(pg_url, tmp_path, pool_size=1))
    async with pool.acquire() as conn:  # the pool's only connection
        conn.add_query_logger(lambda q: sent.append(q.query))
    tenant, key = await tenant_with_key(pg, tmp_path, "pro")
    tenant_id = await pg.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    key_id = key["key_id"]
    period = datetime.now(UTC).date().replace(day=1)
    await pg.execute(
        "INSERT INTO quota_leases (worker_id, tenant_id, period, requests, tokens)"
        " VALUES ('w-trips', $1, $2, 100, 10000)",
        tenant_id,
        period,
    )
    ledger = Ledger(pool, Spool(tmp_path / "spool-w-trips.jsonl"), "w-trips", 60, 30)
    marker = unique("trips")
    for i in range(20):
        ledger.add(_row(tenant_id, key_id, f"{marker}-{i}"))
    try:
        await ledger.flush()
        count = "SELECT count(*) FROM usage_events WHERE request_id LIKE $1"
        assert await pg.fetchval(count, marker + "-%") == 20
        assert sent == [usage_batch._CALL], sent  # no BEGIN, no COMMIT, no second statement
        counter = await pg.fetchrow(
            "SELECT requests_used, tokens_used FROM quota_counters"
            " WHERE tenant_id = $1 AND period = $2",
            tenant_id,
            period,
        )
        assert (counter["requests_used"], counter["tokens_used"]) == (20, 20 * 15)
        lease = await pg.fetchrow(
            "SELECT requests, tokens FROM quota_leases WHERE worker_id = 'w-trips'"
            " AND tenant_id = $1",
            tenant_id,
        )
        assert (lease["requests"], lease["tokens"]) == (80, 10000 - 20 * 15)
        used = await pg.fetchval("SELECT last_used_at FROM api_keys WHERE id = $1", key_id)
        assert used is not None
        # Written again (a replay): nothing moves twice.
        sent.clear()
        for i in range(20):
            ledger.add(_row(tenant_id, key_id, f"{marker}-{i}"))
        await ledger.flush()
        assert await pg.fetchval(count, marker + "-%") == 20
        again = await pg.fetchrow(
            "SELECT requests, tokens FROM quota_leases WHERE worker_id = 'w-trips'"
            " AND tenant_id = $1",
            tenant_id,
        )
        assert (again["requests"], again["tokens"]) == (80, 10000 - 20 * 15)
    finally:
        await ledger.close()
        await pool.close()
