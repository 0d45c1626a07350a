"""Keys, tiers and exact monthly quotas against a real Postgres."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import orjson
import pytest

from proxy.core.principal import Principal
from proxy.web.billing_setup import BillingOptions
from proxy.web.keys import BILLING
from tests.billing_helpers import TEST_TIERS, billing_config, tenant_with_key, wait_for
from tests.conftest import Gateway, StartGateway, StartKeyed
from tests.fakes import FAKE_USAGE, FakeOpenAI
from tests.waiting import until

MSG = [{"role": "user", "content": "hi"}]
EVENTS = (
    "SELECT count(*) FROM usage_events e JOIN tenants t ON t.id = e.tenant_id WHERE t.name = $1"
)


StartBilled = Callable[..., Awaitable[Gateway]]


@pytest.fixture
def start(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, pg_url: str, tmp_path: Path
) -> StartBilled:
    """Starts a gateway with keys and billing on the session's Postgres, in
    front of ``fake_openai``; keywords: ``billing_config``'s billing options."""

    async def go(**billing: Any) -> Gateway:
        return await start_gateway(
            billing_config(fake_openai.url, **billing), database_url=pg_url, data_dir=tmp_path
        )

    return go


async def _chat(
    gw: Gateway,
    key: str,
    model: str = "fake-model",
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> tuple[int, dict[str, str], Any]:
    body = {"model": model, "messages": MSG, **extra}
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.base_url + "/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}", **(headers or {})},
        ) as r,
    ):
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.json()


async def test_key_works_and_usage_is_billed(
    start: StartBilled,
    fake_openai: FakeOpenAI,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    gw = await start()
    tenant, key = await tenant_with_key(pg, tmp_path, "pro")
    client = gw.sdk(api_key=key["api_key"])
    raw = await client.chat.completions.with_raw_response.create(model="fake-model", messages=MSG)
    # -requests: the key's hourly window (per-process here: no Redis); -tokens: monthly
    assert raw.headers["x-ratelimit-limit-requests"] == "1000"
    assert raw.headers["x-ratelimit-limit-tokens"] == "20000000"
    assert raw.headers["x-ratelimit-remaining-requests"] == "999"
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    # the provider saw the tier's max_tokens cap (the reservation's bound)
    assert fake_openai.seen[-1].body["max_tokens"] == 4096
    await wait_for(pg, EVENTS, tenant, expect=1)
    row = await pg.fetchrow(
        "SELECT e.* FROM usage_events e JOIN tenants t ON t.id = e.tenant_id WHERE t.name = $1",
        tenant,
    )
    assert (row["prompt_tokens"], row["completion_tokens"]) == (11, 6)
    assert row["usage_source"] == "provider" and row["counted"] and row["status"] == 200
    assert row["provider"] == "fake" and row["provider_model"] == "upstream-model"
    assert float(row["cost_usd"]) == pytest.approx((11 * 1.0 + 6 * 2.0) / 1e6)
    usage = await _get(gw, "/v1/usage", key["api_key"])
    assert usage["month"]["requests"] == {"used": 1, "limit": 30000, "remaining": 29999}
    assert usage["month"]["tokens"]["used"] == FAKE_USAGE["total_tokens"]
    assert usage["tier"] == "pro" and usage["tenant"] == tenant


async def test_a_reused_request_id_is_billed_every_time(
    start: StartBilled,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    """The client's x-request-id is echoed and logged, never the ledger's
    idempotency key: replaying one must not make requests free."""
    gw = await start()
    tenant, key = await tenant_with_key(pg, tmp_path, "pro")
    for _ in range(3):
        status, headers, _ = await _chat(gw, key["api_key"], headers={"x-request-id": "same-id"})
        assert status == 200 and headers["x-request-id"] == "same-id"
    await wait_for(pg, EVENTS, tenant, expect=3)
    ids = await pg.fetch(
        "SELECT e.request_id FROM usage_events e JOIN tenants t ON t.id = e.tenant_id"
        " WHERE t.name = $1",
        tenant,
    )
    assert [r["request_id"] for r in ids] == ["same-id"] * 3
    usage = await _get(gw, "/v1/usage", key["api_key"])
    assert usage["month"]["requests"]["used"] == 3


async def _get(gw: Gateway, path: str, key: str) -> Any:
    async with (
        aiohttp.ClientSession() as s,
        s.get(gw.url + path, headers={"Authorization": f"Bearer {key}"}) as r,
    ):
        assert r.status == 200, await r.text()
        return await r.json()


@pytest.mark.parametrize(
    "junk",
    [
        "",
        "not-a-key",
        "' OR '1'='1",
        "tw-' OR '1'='1' --",
        "x" * 10_000,
        "tw-\x00" + "a" * 42,
        "sk-" + "a" * 43,
        "tw-" + "a" * 42 + "!",
    ],
)
async def test_junk_keys_get_401_without_a_query(
    start: StartBilled,
    tmp_path: Path,
    junk: str,
) -> None:
    gw = await start()
    auth = gw.app[BILLING].auth
    before = auth.queries
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.base_url + "/chat/completions",
            json={"model": "echo", "messages": MSG},
            headers={"Authorization": "Bearer " + junk.replace("\x00", "%00")},
        ) as r,
    ):
        assert r.status == 401
        body = await r.json()
    assert auth.queries == before
    assert body["error"]["code"] == "invalid_api_key"
    if len(junk) > 3:
        assert junk[3:20] not in body["error"]["message"]  # the key is never echoed


async def test_unknown_revoked_expired_keys_get_the_same_401(
    start: StartBilled,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    gw = await start()
    _, revoked = await tenant_with_key(pg, tmp_path, "pro")
    await pg.execute("UPDATE api_keys SET state = 'revoked' WHERE id = $1", revoked["key_id"])
    _, expired = await tenant_with_key(pg, tmp_path, "pro")
    await pg.execute(
        "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1",
        expired["key_id"],
    )
    unknown = "tw-" + "A" * 43
    bodies = []
    for key in (unknown, revoked["api_key"], expired["api_key"], "garbage"):
        status, _, body = await _chat(gw, key)
        assert status == 401
        bodies.append(body)
    assert all(b == bodies[0] for b in bodies)
    with pytest.raises(openai.AuthenticationError):
        await gw.sdk(api_key=unknown).chat.completions.create(model="echo", messages=MSG)


async def test_revocation_reaches_every_worker_within_the_cache_ttl(
    start: StartBilled,
    pg: asyncpg.Pool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOLLWAY_ADMIN_KEY", "admin-secret-for-tests")
    workers = [await start() for _ in range(2)]
    _, key = await tenant_with_key(pg, tmp_path, "pro")
    for gw in workers:  # both workers have the key cached now
        assert (await _chat(gw, key["api_key"], "echo"))[0] == 200
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            workers[0].url + f"/admin/keys/{key['key_id']}/revoke",
            headers={"Authorization": "Bearer admin-secret-for-tests"},
        ) as r,
    ):
        assert r.status == 200
    loop = asyncio.get_running_loop()
    revoked_at = loop.time()
    ttl = 0.5  # key_cache_ttl_s in billing_config

    async def refused(gw: Gateway) -> bool:
        return (await _chat(gw, key["api_key"], "echo"))[0] != 200

    for gw in workers:
        left = revoked_at + ttl + 1.0 - loop.time()
        await until(functools.partial(refused, gw), max(left, 0.0), interval=0.05)


async def test_ten_left_two_hundred_concurrent_exactly_ten_pass(
    start: StartBilled,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    workers = [await start() for _ in range(2)]
    tenant, key = await tenant_with_key(pg, tmp_path, "tiny")  # 10 requests a month
    results = await asyncio.gather(
        *(_chat(workers[i % 2], key["api_key"], "echo") for i in range(200))
    )
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 10
    assert statuses.count(429) == 190
    rejected = next(r for r in results if r[0] == 429)
    assert rejected[2]["error"]["code"] == "insufficient_quota"
    assert rejected[1]["x-should-retry"] == "false"
    assert int(rejected[1]["retry-after"]) > 0
    assert rejected[1]["x-ratelimit-remaining-requests"] == "0"
    await wait_for(pg, EVENTS + " AND e.counted", tenant, expect=10)
    await wait_for(pg, EVENTS + " AND e.status = 429 AND NOT e.counted", tenant, expect=190)
    used = await pg.fetchval(
        "SELECT requests_used FROM quota_counters c JOIN tenants t ON t.id = c.tenant_id"
        " WHERE t.name = $1",
        tenant,
    )
    assert used == 10


async def test_token_reservation_must_fit(
    start: StartBilled,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    """600 tokens a month; each request reserves prompt (~8) + max_tokens (100)."""
    gw = await start()
    tenant, key = await tenant_with_key(pg, tmp_path, "tokens")
    ok = 0
    for _ in range(40):
        status, _, body = await _chat(gw, key["api_key"])
        if status != 200:
            assert status == 429 and "token quota" in body["error"]["message"]
            break
        ok += 1
    # each call really uses 17 tokens, so refunds let many more than 600/108 through
    assert ok > 5
    await wait_for(pg, EVENTS + " AND e.counted", tenant, expect=ok)
    tokens_used = await pg.fetchval(
        "SELECT tokens_used FROM quota_counters c JOIN tenants t ON t.id = c.tenant_id"
        " WHERE t.name = $1",
        tenant,
    )
    # bound: usage never passes the limit when the provider honours max_tokens
    assert tokens_used == ok * FAKE_USAGE["total_tokens"] <= 600


async def test_model_not_allowed_by_tier_is_403(
    start: StartBilled,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    gw = await start()
    _, key = await tenant_with_key(pg, tmp_path, "free")  # echo and fake-model only
    status, _, body = await _chat(gw, key["api_key"], "fake-other")
    assert status == 403
    assert body["error"]["code"] == "model_not_allowed"
    with pytest.raises(openai.PermissionDeniedError):
        await gw.sdk(api_key=key["api_key"]).chat.completions.create(
            model="fake-other", messages=MSG
        )


async def test_tier_is_checked_before_the_provider_configuration(
    start_keyed: StartKeyed,
    fake_openai: FakeOpenAI,
) -> None:
    """A free key asking for a model of a provider with no API key: the
    answer is about the key's tier (403), not a server variable (503)."""
    cfg = billing_config(fake_openai.url)
    cfg["providers"]["closed"] = {
        "kind": "openai",
        "base_url": fake_openai.url,
        "api_key": "${CLOSED_API_KEY:-}",
    }
    cfg["models"].insert(0, {"name": "fake-closed", "targets": [{"provider": "closed"}]})
    keyed = await start_keyed(cfg, "free")
    status, _, body = await _chat(keyed.gw, keyed.api_key, "fake-closed")
    assert (status, body["error"]["code"]) == (403, "model_not_allowed")
    assert "CLOSED_API_KEY" not in body["error"]["message"]
    pro = await keyed.another()  # allowed: the provider is the reason
    status, _, body = await _chat(keyed.gw, pro.api_key, "fake-closed")
    assert (status, body["error"]["code"]) == (503, "provider_not_configured")


async def test_failures_and_disconnects_are_billed(
    start: StartBilled,
    fake_openai: FakeOpenAI,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    gw = await start()
    tenant, key = await tenant_with_key(pg, tmp_path, "pro")
    failed, _, _ = await _chat(gw, key["api_key"], "fake-error-500")
    assert failed >= 500
    # a stream the provider cuts mid-way: what was delivered is billed
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.base_url + "/chat/completions",
            json={"model": "fake-cut", "messages": MSG, "stream": True},
            headers={"Authorization": f"Bearer {key['api_key']}"},
        ) as r,
    ):
        await r.read()
    # a client that walks away mid-stream
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            gw.base_url + "/chat/completions",
            json={"model": "fake-held", "messages": MSG, "stream": True},
            headers={"Authorization": f"Bearer {key['api_key']}"},
        )
        await resp.content.readany()
        resp.close()
    await wait_for(pg, EVENTS, tenant, expect=3)
    rows = await pg.fetch(
        "SELECT e.* FROM usage_events e JOIN tenants t ON t.id = e.tenant_id WHERE t.name = $1",
        tenant,
    )
    by_kind = {(r["stream"], r["status"]): r for r in rows}
    failed_row = by_kind[(False, failed)]
    assert not failed_row["counted"] and failed_row["completion_tokens"] == 0
    # what reached a provider is on record, since the provider may bill it
    tried = orjson.loads(failed_row["details"])["attempts"]
    assert tried and all(a["provider"] == "fake" and a["status"] == 500 for a in tried)
    cut = by_kind[(True, 502)]
    assert cut["counted"] and cut["usage_source"] == "estimated"
    assert cut["completion_tokens"] >= 1
    gone = by_kind[(True, 499)]
    assert gone["client_disconnected"] and gone["prompt_tokens"] > 0
    fake_openai.release.set()


def _principal(tenant_id: int) -> Principal:
    return Principal("key_x", "tw-x", tenant_id, "t", "tiny", None)


async def test_billing_works_without_prepared_statement_cache(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Behind PgBouncer in transaction mode a named prepared statement may
    land on another backend; TOLLWAY_PG_STATEMENT_CACHE=0 turns them off."""
    monkeypatch.setenv("TOLLWAY_PG_STATEMENT_CACHE", "0")
    monkeypatch.setenv("TOLLWAY_PG_POOL_SIZE", "3")
    opts = BillingOptions.from_env(pg_url, tmp_path)
    assert (opts.statement_cache_size, opts.pool_size) == (0, 3)
    gw = await start_gateway(
        billing_config(fake_openai.url, lease_requests=2),  # a lease call every 2 requests
        database_url=pg_url,
        data_dir=tmp_path,
        statement_cache_size=opts.statement_cache_size,
    )
    tenant, key = await tenant_with_key(pg, tmp_path, "pro")
    for _ in range(5):
        assert (await _chat(gw, key["api_key"]))[0] == 200
    await wait_for(pg, EVENTS, tenant, expect=5)
    usage = await _get(gw, "/v1/usage", key["api_key"])
    assert usage["month"]["requests"]["used"] == 5


async def test_no_combination_of_limits_passes_the_tier_cap(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    """``max_completion_tokens`` and ``max_tokens`` together: both are capped,
    the reservation covers the larger, and the provider gets the smaller under
    the one parameter its model takes (``max_tokens`` for this one)."""
    tiers = {**TEST_TIERS, "narrow": {**TEST_TIERS["tokens"], "monthly_tokens": 60}}
    cfg = {**billing_config(fake_openai.url), "tiers": tiers}
    gw = await start_gateway(cfg, database_url=pg_url, data_dir=tmp_path)
    _, pro = await tenant_with_key(pg, tmp_path, "pro", set(tiers))
    both = {"max_completion_tokens": 100, "max_tokens": 1_000_000}
    status, _, _ = await _chat(gw, pro["api_key"], **both)
    assert status == 200
    sent = fake_openai.seen[-1].body
    assert (sent.get("max_completion_tokens"), sent["max_tokens"]) == (None, 100)
    # 60 tokens a month, cap 100: prompt + 1 fits, prompt + 100 (what
    # max_tokens lets the provider generate) does not.
    _, narrow = await tenant_with_key(pg, tmp_path, "narrow", set(tiers))
    assert (await _chat(gw, narrow["api_key"], max_completion_tokens=1))[0] == 200
    assert fake_openai.seen[-1].body["max_tokens"] == 1  # the parameter its model takes
    assert "max_completion_tokens" not in fake_openai.seen[-1].body
    status, _, body = await _chat(gw, narrow["api_key"], max_completion_tokens=1, max_tokens=10**6)
    assert status == 429 and "token quota" in body["error"]["message"]
