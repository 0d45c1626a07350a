"""The billing pool's connections go back without a reset query (a round
trip per use: every usage flush, key lookup and lease), and a transaction
left open is still rolled back, on a real Postgres."""

from __future__ import annotations

from pathlib import Path

from proxy.web.billing_setup import BillingOptions, open_pool


async def test_a_released_connection_costs_no_reset_query(pg_url: str, tmp_path: Path) -> None:
    pool = await open_pool(BillingOptions(pg_url, tmp_path, pool_size=1))
    sent: list[str] = []
    try:
        async with pool.acquire() as conn:
            conn.add_query_logger(lambda q: sent.append(q.query))
        sent.clear()  # the logger stays with the pool's one connection
        async with pool.acquire() as conn, conn.transaction():
            assert await conn.fetchval("SELECT 1") == 1
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT 2")
    finally:
        await pool.close()
    assert [q.split()[0].upper() for q in sent] == ["BEGIN;", "SELECT", "COMMIT;", "SELECT"]


async def test_a_transaction_left_open_is_rolled_back(pg_url: str, tmp_path: Path) -> None:
    pool = await open_pool(BillingOptions(pg_url, tmp_path, pool_size=1))
    try:
        async with pool.acquire() as conn:
            await conn.execute("CREATE TEMP TABLE IF NOT EXISTS t_open (x int)")
            tx = conn.transaction()
            await tx.start()
            await conn.execute("INSERT INTO t_open VALUES (1)")
            # released without commit or rollback: asyncpg rolls it back
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT count(*) FROM t_open") == 0
    finally:
        await pool.close()
