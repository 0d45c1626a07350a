"""A year of spend reports: ``GET /admin/usage``'s query over a year of rollups.

Fills ``usage_daily`` (with COPY) for one large tenant — a row per day x key
x served model, 365 x 50 x 10 by default — and for smaller neighbours that
share the table, and ``usage_monthly``, ``usage_tenant_daily`` and
``usage_model_daily`` from it (as migrations 0006, 0010 and 0011 backfill
them, the last where the revision has it; the ledger keeps all four in one
statement), then times ``proxy.stores.analytics.report`` (what the
endpoint and ``tollway usage`` run, through an asyncpg pool, so prepared
statements and their plan cache behave as in the gateway) for a year of the
large tenant, grouped each way the rollups answer, and filtered by a key and
by a model.

    .venv/bin/python bench/usage_year.py [--dsn URL] [--keys 50 --models 10 --repeats 100]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg

from proxy.stores import analytics, migrate
from proxy.stores.embedded import EmbeddedPostgres

START = date(2025, 1, 1)
DAYS = 365
COLUMNS = (
    "day",
    "tenant_id",
    "key_id",
    "public_model",
    "provider",
    "served_model",
    "requests",
    "errors",
    "cache_hits",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_usd",
    "unpriced",
)


# Migration 0006's backfill: the monthly rollups of the daily ones.
MONTHLY = """
INSERT INTO usage_monthly
SELECT date_trunc('month', d.day)::date, d.tenant_id, d.key_id, d.public_model, d.provider,
       d.served_model, sum(d.requests), sum(d.errors), sum(d.cache_hits), sum(d.prompt_tokens),
       sum(d.completion_tokens), sum(d.cached_tokens), sum(d.reasoning_tokens),
       sum(d.cost_usd), sum(d.unpriced)
FROM usage_daily d GROUP BY 1, 2, 3, 4, 5, 6
"""
# Migration 0010's backfill: the per-tenant daily rollups of the daily ones.
TENANT_DAILY = """
INSERT INTO usage_tenant_daily
SELECT d.day, d.tenant_id, sum(d.requests), sum(d.errors), sum(d.cache_hits),
       sum(d.prompt_tokens), sum(d.completion_tokens), sum(d.cached_tokens),
       sum(d.reasoning_tokens), sum(d.cost_usd), sum(d.unpriced)
FROM usage_daily d GROUP BY 1, 2
"""

# Migration 0011's backfill: the per-tenant, per-model daily rollups.
MODEL_DAILY = """
INSERT INTO usage_model_daily
SELECT d.day, d.tenant_id, m.model, sum(d.requests), sum(d.errors), sum(d.cache_hits),
       sum(d.prompt_tokens), sum(d.completion_tokens), sum(d.cached_tokens),
       sum(d.reasoning_tokens), sum(d.cost_usd), sum(d.unpriced)
FROM usage_daily d
CROSS JOIN LATERAL (SELECT d.public_model UNION SELECT d.served_model) AS m(model)
GROUP BY 1, 2, 3
"""


def rows(tenant_id: int, keys: int, models: int) -> Iterator[tuple[object, ...]]:
    for d in range(DAYS):
        day = START + timedelta(days=d)
        for k in range(keys):
            for m in range(models):
                n = 1 + (d * 7 + k * 3 + m) % 400
                yield (
                    day,
                    tenant_id,
                    f"key_{tenant_id}_{k:03d}",
                    f"model-{m}",
                    "openai",
                    f"model-{m}-2025",
                    n,
                    n // 50,
                    n // 10,
                    n * 900,
                    n * 250,
                    n * 100,
                    0,
                    Decimal(n) * Decimal("0.0031"),
                    0,
                )


async def fill(pool: asyncpg.Pool, name: str, keys: int, models: int) -> int:
    tenant_id: int = await pool.fetchval(
        "INSERT INTO tenants (name, tier) VALUES ($1, 'pro') RETURNING id", name
    )
    async with pool.acquire() as conn:
        await conn.copy_records_to_table(
            "usage_daily", records=rows(tenant_id, keys, models), columns=COLUMNS
        )
    return tenant_id


async def timed(
    pool: asyncpg.Pool, q: analytics.UsageQuery, repeats: int
) -> tuple[float, float, float, int]:
    found = await analytics.report(pool, q)  # warm
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        found = await analytics.report(pool, q)
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    p99 = times[max(0, math.ceil(len(times) * 0.99) - 1)]
    return statistics.median(times), p99, times[-1], len(found)


async def bench(url: str, args: argparse.Namespace) -> None:
    await migrate.migrate(url)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    assert pool is not None
    try:
        t = time.perf_counter()
        await fill(pool, "acme", args.keys, args.models)
        for i in range(args.neighbours):
            await fill(pool, f"neighbour-{i}", 10, 5)
        await pool.execute(MONTHLY)
        await pool.execute(TENANT_DAILY)
        if await pool.fetchval("SELECT to_regclass('usage_model_daily') IS NOT NULL"):
            await pool.execute(MODEL_DAILY)  # 0011 and after
            await pool.execute("VACUUM ANALYZE usage_model_daily")
        # Settled days are vacuumed (autovacuum's insert threshold), so the
        # tenant's covering index answers with an index-only scan.
        await pool.execute("VACUUM ANALYZE usage_daily")
        await pool.execute("VACUUM ANALYZE usage_monthly")
        await pool.execute("VACUUM ANALYZE usage_tenant_daily")
        total = await pool.fetchval("SELECT count(*) FROM usage_daily")
        months = await pool.fetchval("SELECT count(*) FROM usage_monthly")
        print(
            f"usage_daily rows={total} usage_monthly rows={months}"
            f" fill_s={time.perf_counter() - t:.1f}",
            flush=True,
        )
        end = START + timedelta(days=DAYS - 1)
        mid = START + timedelta(days=14)
        cases = [(g, analytics.UsageQuery(START, end, g, "acme")) for g in ("day", "model", "key")]
        cases += [
            ("tenant (all)", analytics.UsageQuery(START, end, "tenant")),
            ("day, one key", analytics.UsageQuery(START, end, "day", "acme", key="key_1_007")),
            ("day, one model", analytics.UsageQuery(START, end, "day", "acme", model="model-3")),
            (
                "day, served model",
                analytics.UsageQuery(START, end, "day", "acme", model="model-3-2025"),
            ),
            (
                "day, model, all",  # every tenant
                analytics.UsageQuery(START, end, "day", model="model-3"),
            ),
            # Partial months at both ends: 17 + 14 edge days from usage_daily.
            (
                "model, mid-month",
                analytics.UsageQuery(mid, end - timedelta(days=17), "model", "acme"),
            ),
            ("key, one key", analytics.UsageQuery(START, end, "key", "acme", key="key_1_007")),
        ]
        for label, q in cases:
            p50, p99, worst, n = await timed(pool, q, args.repeats)
            print(
                f"group_by={label:<17} rows_out={n:<4} p50_ms={p50:.1f}"
                f" p99_ms={p99:.1f} max_ms={worst:.1f}"
            )
    finally:
        await pool.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", help="an empty, migratable Postgres (default: embedded)")
    ap.add_argument("--keys", type=int, default=50)
    ap.add_argument("--models", type=int, default=10)
    ap.add_argument("--neighbours", type=int, default=9, help="tenants of 10 keys x 5 models")
    ap.add_argument("--repeats", type=int, default=100)
    args = ap.parse_args()
    if args.dsn:
        await bench(args.dsn, args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedPostgres(Path(tmp) / "pg", cleanup="delete")
        url = server.start()
        try:
            await bench(url, args)
        finally:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
