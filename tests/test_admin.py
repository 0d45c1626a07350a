"""The /admin/ API: same operations as the CLI, audited, never leaking a secret."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.billing_helpers import billing_config
from tests.conftest import Gateway, StartGateway
from tests.db import unique
from tests.fakes import FakeOpenAI

ADMIN = "admin-canary-7d1f"


async def _call(
    gw: Gateway, method: str, path: str, body: Any = None, key: str = ADMIN
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.request(
            method, gw.url + path, json=body, headers={"Authorization": f"Bearer {key}"}
        ) as r,
    ):
        return r.status, await r.json()


@pytest.fixture
async def admin_gw(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Gateway:
    monkeypatch.setenv("TOLLWAY_ADMIN_KEY", ADMIN)
    return await start_gateway(
        billing_config(fake_openai.url), database_url=pg_url, data_dir=tmp_path
    )


async def test_tenant_and_key_lifecycle_is_audited(admin_gw: Gateway, pg: asyncpg.Pool) -> None:
    name = unique("acme")
    assert (await _call(admin_gw, "POST", "/admin/tenants", {"name": name, "tier": "pro"}))[
        0
    ] == 201
    status, key = await _call(
        admin_gw, "POST", "/admin/keys", {"tenant": name, "name": "ci-bot", "expires_in_days": 365}
    )
    assert status == 201
    assert key["api_key"].startswith("tw-") and key["tenant"] == name and key["tier"] == "pro"
    assert key["rate_limit"]["monthly_requests"] == 30000 and key["expires_at"]
    # the new key works
    chat = {"model": "echo", "messages": [{"role": "user", "content": "x"}]}
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            admin_gw.base_url + "/chat/completions",
            json=chat,
            headers={"Authorization": f"Bearer {key['api_key']}"},
        ) as r,
    ):
        assert r.status == 200
    status, listed = await _call(admin_gw, "GET", f"/admin/keys?tenant={name}")
    assert [k["key_id"] for k in listed["data"]] == [key["key_id"]]
    assert "api_key" not in listed["data"][0]
    status, rotated = await _call(admin_gw, "POST", f"/admin/keys/{key['key_id']}/rotate")
    assert status == 201 and rotated["replaces"] == key["key_id"]
    assert (await _call(admin_gw, "POST", f"/admin/keys/{rotated['key_id']}/revoke"))[0] == 200
    status, tenant = await _call(admin_gw, "PATCH", f"/admin/tenants/{name}", {"tier": "tiny"})
    assert status == 200 and tenant["tier"] == "tiny"
    rows = await pg.fetch(
        "SELECT actor, action, before::text, after::text FROM audit_log"
        " WHERE target = $1 OR target = $2 OR target = $3 ORDER BY id",
        name,
        key["key_id"],
        rotated["key_id"],
    )
    assert [r["action"] for r in rows] == [
        "tenant.create",
        "key.create",
        "key.rotate",
        "key.revoke",
        "tenant.set_tier",
    ]
    assert {r["actor"] for r in rows} == {"admin-api"}
    text = " ".join(str(dict(r)) for r in rows)
    for secret in (key["api_key"], rotated["api_key"], ADMIN, "digest"):
        assert secret not in text


async def test_admin_refusals(admin_gw: Gateway) -> None:
    status, body = await _call(admin_gw, "GET", "/admin/tenants", key="wrong")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = await _call(
        admin_gw, "POST", "/admin/tenants", {"name": unique("x"), "tier": "platinum"}
    )
    assert status == 400 and "unknown tier 'platinum'" in body["error"]["message"]
    status, body = await _call(admin_gw, "POST", "/admin/keys", {"tenant": "no-such-tenant"})
    assert status == 404
    status, body = await _call(admin_gw, "POST", "/admin/keys/key_nope/revoke")
    assert status == 404 and body["error"]["type"] == "invalid_request_error"


async def test_admin_api_is_off_without_an_admin_key(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TOLLWAY_ADMIN_KEY", raising=False)
    gw = await start_gateway(
        billing_config(fake_openai.url), database_url=pg_url, data_dir=tmp_path
    )
    status, body = await _call(gw, "GET", "/admin/tenants", key="anything")
    assert status == 404 and body["error"]["code"] == "not_found"
