"""Daily and monthly rollups agree with the usage rows; /admin/usage and
`tollway usage` read them (monthly for whole months, daily for the edges)."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from proxy.stores import analytics
from tests.billing_helpers import billing_config, tenant_with_key, wait_for
from tests.conftest import Gateway, StartGateway
from tests.fakes import FakeOpenAI

ADMIN = "admin-usage-5b1f"
MSG = [{"role": "user", "content": "hi"}]
PRICES = {
    "upstream-model": {"prompt": 1.0, "completion": 2.0},
    "fake-cut": {"prompt": 1.0, "completion": 2.0},
}
EVENTS = (
    "SELECT count(*) FROM usage_events e JOIN tenants t ON t.id = e.tenant_id WHERE t.name = $1"
)
# The rows summed the way the rollups sum them, by day x key x public model x served model.
FROM_ROWS = """
SELECT (e.created_at AT TIME ZONE 'UTC')::date AS day, coalesce(e.key_id, '') AS key_id,
       coalesce(e.public_model, '') AS public_model, coalesce(e.provider, '') AS provider,
       coalesce(e.provider_model, e.public_model, '') AS served_model,
       count(*) AS requests, count(*) FILTER (WHERE e.status >= 400) AS errors,
       count(*) FILTER (WHERE e.cached) AS cache_hits,
       sum(e.prompt_tokens) AS prompt_tokens, sum(e.completion_tokens) AS completion_tokens,
       coalesce(sum(e.cost_usd), 0) AS cost_usd,
       count(*) FILTER (WHERE e.cost_usd IS NULL) AS unpriced
FROM usage_events e JOIN tenants t ON t.id = e.tenant_id WHERE t.name = $1
GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
"""
FROM_ROLLUPS = """
SELECT u.day, u.key_id, u.public_model, u.provider, u.served_model, u.requests, u.errors,
       u.cache_hits, u.prompt_tokens, u.completion_tokens, u.cost_usd, u.unpriced
FROM usage_daily u JOIN tenants t ON t.id = u.tenant_id WHERE t.name = $1
ORDER BY 1, 2, 3, 4, 5
"""

# The daily rollups summed by month, and the monthly rollups, for a tenant.
_MONTH_COLS = "key_id, public_model, provider, served_model"
_MONTH_SUMS = ", ".join(f"sum(u.{f}) AS {f}" for f in analytics.FIELDS)
DAILY_BY_MONTH = f"""
SELECT date_trunc('month', u.day)::date AS month, {_MONTH_COLS}, {_MONTH_SUMS}
FROM usage_daily u JOIN tenants t ON t.id = u.tenant_id WHERE t.name = $1
GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
"""
FROM_MONTHLY = f"""
SELECT u.month, {_MONTH_COLS}, {_MONTH_SUMS}
FROM usage_monthly u JOIN tenants t ON t.id = u.tenant_id WHERE t.name = $1
GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
"""
# Migration 0006's backfill, for one tenant's synthetic daily rows.
BACKFILL = f"""
INSERT INTO usage_monthly
SELECT date_trunc('month', u.day)::date, u.tenant_id, {_MONTH_COLS}, {_MONTH_SUMS}
FROM usage_daily u WHERE u.tenant_id = $1 GROUP BY 1, 2, 3, 4, 5, 6
"""
# The daily rollups summed per day (every key and model), and the per-tenant
# daily rollups; migration 0010's backfill of the latter.
_DAY_SUMS = ", ".join(f"sum(u.{f}) AS {f}" for f in analytics.FIELDS)
DAILY_BY_DAY = f"""
SELECT u.day, {_DAY_SUMS}
FROM usage_daily u JOIN tenants t ON t.id = u.tenant_id WHERE t.name = $1
GROUP BY 1 ORDER BY 1
"""
FROM_TENANT_DAILY = f"""
SELECT u.day, {", ".join(f"u.{f}" for f in analytics.FIELDS)}
FROM usage_tenant_daily u JOIN tenants t ON t.id = u.tenant_id WHERE t.name = $1
ORDER BY 1
"""
BACKFILL_TENANT = f"""
INSERT INTO usage_tenant_daily
SELECT u.day, u.tenant_id, {_DAY_SUMS}
FROM usage_daily u WHERE u.tenant_id = $1 GROUP BY 1, 2
"""

# The rows summed per day and model, a row counted under each distinct name
# among its public and served model (what ``model=X`` matches); the per-model
# daily rollups; migration 0011's backfill of the latter.
ROWS_BY_MODEL = """
SELECT (e.created_at AT TIME ZONE 'UTC')::date AS day, m.model,
       count(*) AS requests, count(*) FILTER (WHERE e.status >= 400) AS errors,
       count(*) FILTER (WHERE e.cached) AS cache_hits,
       sum(e.prompt_tokens) AS prompt_tokens, sum(e.completion_tokens) AS completion_tokens,
       coalesce(sum(e.cost_usd), 0) AS cost_usd,
       count(*) FILTER (WHERE e.cost_usd IS NULL) AS unpriced
FROM usage_events e JOIN tenants t ON t.id = e.tenant_id
CROSS JOIN LATERAL (SELECT coalesce(e.public_model, '')
                    UNION SELECT coalesce(e.provider_model, e.public_model, '')) AS m(model)
WHERE t.name = $1
GROUP BY 1, 2 ORDER BY 1, 2
"""
FROM_MODEL_DAILY = """
SELECT u.day, u.model, u.requests, u.errors, u.cache_hits, u.prompt_tokens,
       u.completion_tokens, u.cost_usd, u.unpriced
FROM usage_model_daily u JOIN tenants t ON t.id = u.tenant_id WHERE t.name = $1
ORDER BY 1, 2
"""
BACKFILL_MODEL = f"""
INSERT INTO usage_model_daily
SELECT u.day, u.tenant_id, m.model, {_DAY_SUMS}
FROM usage_daily u
CROSS JOIN LATERAL (SELECT u.public_model UNION SELECT u.served_model) AS m(model)
WHERE u.tenant_id = $1 GROUP BY 1, 2, 3
"""


def _config(fake: FakeOpenAI) -> dict[str, Any]:
    cfg = billing_config(fake.url)
    cfg["prices"] = PRICES
    cfg["models"] = [
        *cfg["models"],
        {
            "name": "fb",
            "targets": [{"provider": "fake", "model": "error-503"}],
            "fallbacks": ["fake-model"],
        },
    ]
    return cfg


async def _post(gw: Gateway, key: str, body: dict[str, Any]) -> int:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.base_url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as r,
    ):
        await r.read()
        return r.status


async def _walk_away(gw: Gateway, key: str) -> None:
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            gw.base_url + "/chat/completions",
            json={"model": "fake-held", "messages": MSG, "stream": True},
            headers={"Authorization": f"Bearer {key}"},
        )
        await resp.content.readany()
        resp.close()


async def _mixed_run(gw: Gateway, key: str) -> int:
    """Successes, streams, a fallback, provider failures, a cut stream and a
    client that walks away; returns how many requests were sent."""
    bodies = [
        {"model": "fake-model", "messages": MSG},
        {"model": "fake-model", "messages": MSG, "stream": True},
        {"model": "fb", "messages": MSG},  # served by fake-model's target
        {"model": "fake-error-500", "messages": MSG},
        {"model": "fake-cut", "messages": MSG, "stream": True},
        {"model": "fake-usage-none", "messages": MSG},  # unpriced served model
    ]
    statuses = await asyncio.gather(*(_post(gw, key, b) for b in bodies * 3))
    assert 200 in statuses and any(s >= 500 for s in statuses)
    await _walk_away(gw, key)
    return len(bodies) * 3 + 1


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)


async def test_rollups_equal_the_rows_after_a_mixed_run(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOLLWAY_ADMIN_KEY", ADMIN)
    gw = await start_gateway(_config(fake_openai), database_url=pg_url, data_dir=tmp_path)
    tenant, key = await tenant_with_key(pg, tmp_path, "pro")
    sent = await _mixed_run(gw, key["api_key"])
    fake_openai.release.set()
    await wait_for(pg, EVENTS, tenant, expect=sent)
    rows = [dict(r) for r in await pg.fetch(FROM_ROWS, tenant)]
    rollups = [dict(r) for r in await pg.fetch(FROM_ROLLUPS, tenant)]
    assert rollups == rows
    monthly = [dict(r) for r in await pg.fetch(FROM_MONTHLY, tenant)]
    assert monthly and monthly == [dict(r) for r in await pg.fetch(DAILY_BY_MONTH, tenant)]
    per_day = [dict(r) for r in await pg.fetch(FROM_TENANT_DAILY, tenant)]
    assert per_day and per_day == [dict(r) for r in await pg.fetch(DAILY_BY_DAY, tenant)]
    per_model = [dict(r) for r in await pg.fetch(FROM_MODEL_DAILY, tenant)]
    assert per_model and per_model == [dict(r) for r in await pg.fetch(ROWS_BY_MODEL, tenant)]
    # The fallback's rows count under both names: fb (asked) and the one that served.
    assert {"fb", "upstream-model"} <= {r["model"] for r in per_model}
    served = {r["served_model"] for r in rollups}
    assert {"upstream-model", "fake-error-500", "fake-cut", "fake-held"} <= served
    fallback = [r for r in rollups if r["public_model"] == "fb"]
    assert fallback and {r["served_model"] for r in fallback} == {"upstream-model"}
    # A replayed batch moves nothing: the ledger writes only new rows.
    assert sum(r["requests"] for r in rollups) == sent

    async with aiohttp.ClientSession() as s:
        url = f"{gw.url}/admin/usage?tenant={tenant}&group_by=model"
        async with s.get(url, headers={"Authorization": f"Bearer {ADMIN}"}) as r:
            assert r.status == 200
            report = await r.json()
        async with s.get(
            f"{gw.url}/admin/usage?group_by=week", headers={"Authorization": f"Bearer {ADMIN}"}
        ) as r:
            assert r.status == 400
            assert (await r.json())["error"]["param"] == "group_by"
    by_model = {row["model"]: row for row in report["data"]}
    assert by_model["upstream-model"]["requests"] == sum(
        r["requests"] for r in rollups if r["served_model"] == "upstream-model"
    )
    assert sum(row["requests"] for row in report["data"]) == sent

    cli = [sys.executable, "-m", "proxy", "usage", "--tenant", tenant, "--group-by", "model"]
    env = {**os.environ, "DATABASE_URL": pg_url}
    out = await asyncio.to_thread(_run, [*cli, "--csv"], env)
    assert out.returncode == 0, out.stderr
    parsed = list(csv.DictReader(io.StringIO(out.stdout)))
    assert {r["model"]: int(r["requests"]) for r in parsed} == {
        m: row["requests"] for m, row in by_model.items()
    }
    table = await asyncio.to_thread(_run, cli, env)
    assert table.returncode == 0 and "upstream-model" in table.stdout


async def test_a_request_admitted_last_month_and_written_this_month_is_in_the_raw_reports(
    pg: asyncpg.Pool, tmp_path: Path
) -> None:
    """Rows are partitioned by the month they were admitted in, reported by the
    day they were written: a stream that crosses midnight at a month's end
    is in the next month's ``user`` report, as it is in its rollups."""
    tenant, key = await tenant_with_key(pg, tmp_path, "pro")
    tenant_id = await pg.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    month = datetime.now(UTC).date().replace(day=1)  # migrate made its and the last partition
    last = (month - timedelta(days=1)).replace(day=1)
    await pg.execute(
        "INSERT INTO usage_events (period, event_id, request_id, created_at, tenant_id, key_id,"
        " endpoint, counted, status, end_user)"
        " VALUES ($1, 'ev-midnight', 'req-midnight', $2, $3, $4, 'chat', true, 200, 'u1')",
        last,
        datetime(month.year, month.month, 1, 0, 0, 1, tzinfo=UTC),
        tenant_id,
        key["key_id"],
    )
    q = analytics.UsageQuery(month, month, "user", tenant)
    assert [(r["user"], r["requests"]) for r in await analytics.report(pg, q)] == [("u1", 1)]


async def _synthetic_months(pg: asyncpg.Pool, tmp_path: Path) -> tuple[str, str]:
    """A tenant with daily rollups from 2025-01-03 to 2025-05-27 (two keys,
    three models, a different count each day) and the monthly rollups of them."""
    tenant, key = await tenant_with_key(pg, tmp_path, "pro")
    tenant_id = await pg.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    rows = []
    day = date(2025, 1, 3)
    while day <= date(2025, 5, 27):
        for k, key_id in enumerate((key["key_id"], "other-key")):
            for m in range(3):
                n = 1 + (day.toordinal() * 7 + k * 3 + m) % 40
                rows.append(
                    (
                        day,
                        tenant_id,
                        key_id,
                        f"pub-{m}",
                        "p",
                        f"served-{m % 2}",
                        n,
                        n // 7,
                        n // 5,
                        n * 9,
                        n * 4,
                        n,
                        n // 3,
                        Decimal(n) * Decimal("0.00000123"),
                        n % 2,
                    )
                )
        day += timedelta(days=1)
    cols = (
        "day",
        "tenant_id",
        "key_id",
        "public_model",
        "provider",
        "served_model",
        *analytics.FIELDS,
    )
    async with pg.acquire() as conn:
        await conn.copy_records_to_table("usage_daily", records=rows, columns=cols)
    await pg.execute(BACKFILL, tenant_id)
    await pg.execute(BACKFILL_TENANT, tenant_id)
    await pg.execute(BACKFILL_MODEL, tenant_id)
    return tenant, key["key_id"]


async def _from_daily_alone(pg: asyncpg.Pool, q: analytics.UsageQuery) -> list[dict[str, Any]]:
    """The report summed in Python from the tenant's daily rollups only."""
    rows = await pg.fetch(
        "SELECT u.*, t.name FROM usage_daily u JOIN tenants t ON t.id = u.tenant_id"
        " WHERE t.name = $1 AND u.day BETWEEN $2 AND $3",
        q.tenant,
        q.start,
        q.end,
    )
    column = {"day": "day", "model": "served_model", "key": "key_id", "tenant": "name"}
    sums: dict[str, dict[str, Any]] = defaultdict(lambda: dict.fromkeys(analytics.FIELDS, 0))
    for r in rows:
        if q.key is not None and r["key_id"] != q.key:
            continue
        if q.model is not None and q.model not in (r["public_model"], r["served_model"]):
            continue
        group = str(r[column[q.group_by]])
        for f in analytics.FIELDS:
            sums[group][f] += r[f]
    return [
        {q.group_by: g, **{f: f"{v:.8f}" if f == "cost_usd" else v for f, v in sums[g].items()}}
        for g in sorted(sums)
    ]


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (date(2025, 1, 15), date(2025, 5, 10)),  # partial, three whole months, partial
        (date(2025, 2, 1), date(2025, 4, 30)),  # whole months only
        (date(2025, 1, 1), date(2025, 3, 31)),  # whole months, the first one half empty
        (date(2025, 3, 5), date(2025, 3, 25)),  # inside one month
        (date(2025, 2, 20), date(2025, 3, 10)),  # two partial months, no whole one
        (date(2024, 12, 1), date(2025, 12, 31)),  # beyond the data at both ends
    ],
)
async def test_a_report_over_whole_and_partial_months_equals_the_daily_rollups_alone(
    pg: asyncpg.Pool, tmp_path: Path, start: date, end: date
) -> None:
    tenant, key = await _synthetic_months(pg, tmp_path)
    filters: list[dict[str, str]] = [
        {},
        {"key": key},
        {"model": "served-1"},
        {"model": "pub-2"},
        {"key": key, "model": "pub-2"},
    ]
    for group_by in ("day", "model", "key", "tenant"):
        for f in filters:
            q = analytics.UsageQuery(start, end, group_by, tenant, **f)
            got = await analytics.report(pg, q)
            assert got == await _from_daily_alone(pg, q), (group_by, f)
            assert got, (group_by, f)  # every range holds some of the data
