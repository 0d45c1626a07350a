"""A tenant's and a key's own USD budgets, set through the admin API and the CLI."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from tests.billing_helpers import billing_config, tenant_with_key
from tests.conftest import Gateway, StartGateway
from tests.fakes import FakeOpenAI
from tests.test_budgets import PRICES, TIERS
from tests.test_cli import _env, _tollway

ADMIN = "admin-budget-5c2e"
AUDIT = (
    "SELECT actor, action, before::text, after::text FROM audit_log"
    " WHERE target = $1 AND action LIKE '%set_budgets' ORDER BY id"
)


@pytest.fixture
async def gw(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Gateway:
    monkeypatch.setenv("TOLLWAY_ADMIN_KEY", ADMIN)
    cfg = {**billing_config(fake_openai.url), "tiers": TIERS, "prices": PRICES}
    return await start_gateway(cfg, database_url=pg_url, data_dir=tmp_path)


async def _admin(gw: Gateway, method: str, path: str, body: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.request(
            method, gw.url + path, json=body, headers={"Authorization": f"Bearer {ADMIN}"}
        ) as r,
    ):
        return r.status, await r.json()


async def _chat(gw: Gateway, key: str) -> tuple[int, str]:
    """One request that costs exactly 60 micro-dollars (6 tokens x $10/1M)."""
    body = {"model": "fake-model", "max_tokens": 6, "messages": [{"role": "user", "content": "hi"}]}
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.base_url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as r,
    ):
        data = await r.json()
        return r.status, (data.get("error") or {}).get("message", "")


async def _spend_until_refused(gw: Gateway, key: str, budget: str, limit: float = 20.0) -> int:
    """Requests pass until one is refused naming ``budget``; how many passed.

    A refusal naming another budget is a worker that has not yet read the
    change (keys are cached for ``key_cache_ttl_s``): it is retried until the
    deadline, but only before anything passed under the new budget.
    """
    passed, deadline = 0, time.monotonic() + limit
    for _ in range(2_000):
        status, message = await _chat(gw, key)
        if status == 200:
            passed += 1
        elif status == 429 and budget in message:
            return passed
        else:
            assert status == 429 and passed == 0, (status, message)
            assert time.monotonic() < deadline, f"still refused with: {message}"
            # Polling the condition (the key cache's TTL running out), bounded
            # by the deadline: a refusal is answered in microseconds, so a
            # count alone could run out before the TTL does.
            await asyncio.sleep(0.05)
    raise AssertionError(f"never refused by {budget}")


async def test_a_tenant_override_is_enforced_then_cleared_back_to_the_tier(
    gw: Gateway, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    tenant, key = await tenant_with_key(pg, tmp_path, "refund", set(TIERS))  # tier: $0.001
    status, row = await _admin(
        gw, "PATCH", f"/admin/tenants/{tenant}", {"budgets": {"monthly_usd": 0.0003}}
    )
    assert status == 200 and row["budgets"] == {"monthly_usd": 0.0003}
    own = f"tenant '{tenant}' monthly budget ($0.000300)"
    assert await _spend_until_refused(gw, key["api_key"], own) == 5  # 5 x 60 = 300
    status, row = await _admin(gw, "PATCH", f"/admin/tenants/{tenant}", {"budgets": None})
    assert status == 200 and row["budgets"] is None
    tier = f"tenant '{tenant}' monthly budget ($0.001000)"
    assert await _spend_until_refused(gw, key["api_key"], tier) == 11  # 300 + 11 x 60 = 960
    rows = await pg.fetch(AUDIT, tenant)
    assert [(r["actor"], r["action"]) for r in rows] == [("admin-api", "tenant.set_budgets")] * 2
    assert [orjson.loads(r["before"])["budgets"] for r in rows] == [None, {"monthly_usd": 0.0003}]
    assert [orjson.loads(r["after"])["budgets"] for r in rows] == [{"monthly_usd": 0.0003}, None]


async def test_a_key_override_adds_a_budget_and_null_lifts_the_tiers(
    gw: Gateway, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    tenant, key = await tenant_with_key(pg, tmp_path, "usd", set(TIERS))  # tier: $0.0006
    key_id, prefix = key["key_id"], key["prefix"]
    status, row = await _admin(
        gw, "PATCH", f"/admin/keys/{key_id}", {"budgets": {"daily_usd": "0.00012"}}
    )
    assert status == 200 and row["budgets"] == {"daily_usd": 0.00012} and row["tenant"] == tenant
    own = f"key {prefix}… daily budget ($0.000120)"
    assert await _spend_until_refused(gw, key["api_key"], own) == 2
    # The tenant's own "no budget" lifts the tier's $0.0006; the key's $0.0012 a day is next.
    for path, budgets in (
        (f"/admin/tenants/{tenant}", {"monthly_usd": None}),
        (f"/admin/keys/{key_id}", {"daily_usd": 0.0012}),
    ):
        assert (await _admin(gw, "PATCH", path, {"budgets": budgets}))[0] == 200
    own = f"key {prefix}… daily budget ($0.001200)"
    assert await _spend_until_refused(gw, key["api_key"], own) == 18  # 120 + 18 x 60 = 1200
    actions = [r["action"] for r in await pg.fetch(AUDIT, key_id)]
    assert actions == ["key.set_budgets"] * 2


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/admin/tenants/{tenant}", {"budgets": {"monthly_usd": -5}}, 400, "budgets.monthly_usd"),
        ("/admin/tenants/{tenant}", {"budgets": {"weekly_usd": 5}}, 400, "unknown budget"),
        ("/admin/tenants/{tenant}", {"budgets": {}}, 400, "at least one of"),
        ("/admin/tenants/{tenant}", {"budgets": 5}, 400, "must be an object"),
        ("/admin/tenants/{tenant}", {"budget": {"monthly_usd": 5}}, 400, "Unknown field"),
        ("/admin/keys/{key_id}", {"budgets": {"daily_usd": "lots"}}, 400, "budgets.daily_usd"),
        ("/admin/keys/key_nope", {"budgets": {"daily_usd": 1}}, 404, "no key with id"),
        ("/admin/tenants/no-such-tenant", {"budgets": {"daily_usd": 1}}, 404, "no tenant"),
    ],
)
async def test_bad_budgets_are_refused_and_change_nothing(
    gw: Gateway, pg: asyncpg.Pool, tmp_path: Path, path: str, body: Any, status: int, says: str
) -> None:
    tenant, key = await tenant_with_key(pg, tmp_path, "usd", set(TIERS))
    got, answer = await _admin(gw, "PATCH", path.format(tenant=tenant, key_id=key["key_id"]), body)
    assert got == status and says in answer["error"]["message"], answer
    assert await pg.fetchval("SELECT budgets FROM tenants WHERE name = $1", tenant) is None
    assert await pg.fetchval("SELECT budgets FROM api_keys WHERE id = $1", key["key_id"]) is None
    assert (
        await pg.fetchval(
            "SELECT count(*) FROM audit_log WHERE action LIKE '%budgets'"
            " AND (target = $1 OR target = $2)",
            tenant,
            key["key_id"],
        )
        == 0
    )


def test_the_cli_sets_and_clears_budgets(pg_url: str, tmp_path: Path) -> None:
    env = _env(pg_url, tmp_path)
    tenant = f"cli-b-{tmp_path.name[-8:]}".replace("_", "-")
    assert _tollway("tenants", "create", tenant, "--tier", "pro", env=env).returncode == 0
    key = json.loads(_tollway("keys", "create", "--tenant", tenant, "--json", env=env).stdout)

    def budgets(*args: str) -> Any:
        out = _tollway(*args, "--json", env=env)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["budgets"]

    tenant_cmd = ("tenants", "set-budget", tenant)
    assert budgets(*tenant_cmd, "--monthly-usd", "50", "--daily-usd", "5") == {
        "monthly_usd": 50,
        "daily_usd": 5,
    }
    assert budgets(*tenant_cmd, "--daily-usd", "none") == {"monthly_usd": 50, "daily_usd": None}
    assert budgets("keys", "set-budget", key["key_id"], "--monthly-usd", "2.5") == {
        "monthly_usd": 2.5
    }
    assert "'monthly_usd': 50.0}" in _tollway("tenants", "list", env=env).stdout
    assert budgets(*tenant_cmd, "--clear") is None
    for bad, says in (
        (("--monthly-usd", "-1"), "budgets.monthly_usd: must be a number of USD >= 0"),
        ((), "give --monthly-usd and/or --daily-usd, or --clear"),
        (("--clear", "--daily-usd", "1"), "--clear cannot be combined"),
    ):
        out = _tollway(*tenant_cmd, *bad, env=env)
        assert out.returncode == 2 and out.stderr.startswith(f"tollway: {says}"), out.stderr
    actions = _tollway_audit(pg_url, tenant, key["key_id"])
    assert actions == ["tenant.set_budgets"] * 2 + ["key.set_budgets", "tenant.set_budgets"]


def _tollway_audit(pg_url: str, *targets: str) -> list[str]:
    async def fetch() -> list[str]:
        conn = await asyncpg.connect(pg_url)
        try:
            rows = await conn.fetch(
                "SELECT actor, action FROM audit_log WHERE target = ANY($1::text[])"
                " AND action LIKE '%set_budgets' ORDER BY id",
                list(targets),
            )
        finally:
            await conn.close()
        assert all(r["actor"].startswith("cli") for r in rows)
        return [r["action"] for r in rows]

    return asyncio.run(fetch())
