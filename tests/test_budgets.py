"""USD budgets against a real Postgres: exact admission, refunds, the 429."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from tests.billing_helpers import TEST_TIERS, billing_config, tenant_with_key, wait_for
from tests.conftest import Gateway, StartGateway
from tests.fakes import FakeOpenAI
from tests.loopback import serve_app

# $10 per 1M completion tokens, prompts free: a request with max_tokens=6
# may cost at most 60 micro-dollars, and the fake provider bills exactly 6
# completion tokens, so its real cost is its reservation.
PRICES = {"fake-model": {"prompt": 0, "completion": 10.0}}
TIERS: dict[str, Any] = {
    **TEST_TIERS,
    "usd": {"requests_per_hour": 100_000, "max_tokens": 100, "monthly_budget_usd": 0.0006},
    "refund": {"requests_per_hour": 100_000, "max_tokens": 100, "monthly_budget_usd": 0.001},
}
SPENT = (
    "SELECT coalesce(sum(c.used_micros), 0) FROM budget_counters c JOIN tenants t"
    " ON c.subject = 't:' || t.id WHERE t.name = $1 AND c.span = 'month'"
)
HELD = (
    "SELECT coalesce(sum(l.micros), 0) FROM budget_leases l JOIN tenants t"
    " ON l.subject = 't:' || t.id WHERE t.name = $1"
)


async def _gateway(
    start_gateway: StartGateway, fake: FakeOpenAI, pg_url: str, tmp: Path
) -> Gateway:
    cfg = {**billing_config(fake.url), "tiers": TIERS, "prices": PRICES}
    return await start_gateway(cfg, database_url=pg_url, data_dir=tmp)


async def _chat(gw: Gateway, key: str, max_tokens: int) -> tuple[int, dict[str, str], Any]:
    body = {
        "model": "fake-model",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hi"}],
    }
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.base_url + "/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
        ) as r,
    ):
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.json()


async def test_room_for_ten_two_hundred_concurrent_on_two_workers_exactly_ten_pass(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    workers = [await _gateway(start_gateway, fake_openai, pg_url, tmp_path) for _ in range(2)]
    tenant, key = await tenant_with_key(pg, tmp_path, "usd", set(TIERS))
    results = await asyncio.gather(*(_chat(workers[i % 2], key["api_key"], 6) for i in range(200)))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 10, statuses
    assert statuses.count(429) == 190
    _, headers, body = next(r for r in results if r[0] == 429)
    assert body["error"]["code"] == "insufficient_quota"
    assert body["error"]["type"] == "insufficient_quota"
    assert f"tenant '{tenant}' monthly budget ($0.000600)" in body["error"]["message"]
    assert headers["x-should-retry"] == "false"
    assert int(headers["retry-after"]) > 0
    await wait_for(pg, SPENT, tenant, expect=600)
    await wait_for(pg, HELD, tenant, expect=0)  # every reservation settled


async def test_settling_refunds_what_a_request_did_not_spend(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    gw = await _gateway(start_gateway, fake_openai, pg_url, tmp_path)
    tenant, key = await tenant_with_key(pg, tmp_path, "refund", set(TIERS))
    # Each request reserves 50 x $10/1M = 500 micro-dollars and spends 60:
    # without refunds 2 would fit in 1,000; with them 9 (9 x 60 = 540, and
    # the 460 left cannot hold another 500).
    statuses = [(await _chat(gw, key["api_key"], 50))[0] for _ in range(12)]
    assert statuses == [200] * 9 + [429] * 3
    await wait_for(pg, SPENT, tenant, expect=540)
    async with (
        aiohttp.ClientSession() as s,
        s.get(gw.base_url + "/usage", headers={"Authorization": f"Bearer {key['api_key']}"}) as r,
    ):
        budgets = (await r.json())["budgets"]
    assert budgets == [
        {
            "budget": f"tenant '{tenant}' monthly budget",
            "scope": "tenant",
            "span": "month",
            "period": budgets[0]["period"],
            "spent_usd": "0.000540",
            "limit_usd": "0.001000",
            "remaining_usd": "0.000460",
            "resets_at": budgets[0]["resets_at"],
        }
    ]


SECRET_KEY = bytes(range(32))
SECRET = "whsec_" + base64.b64encode(SECRET_KEY).decode()


@dataclass
class Receiver:
    """A webhook endpoint that checks Standard Webhooks signatures itself."""

    events: list[dict[str, Any]] = field(default_factory=list)
    forged: int = 0
    url: str = ""
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        msg_id = request.headers["webhook-id"]
        ts = request.headers["webhook-timestamp"]
        mac = hmac.new(SECRET_KEY, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
        expected = "v1," + base64.b64encode(mac).decode()
        fresh = abs(time.time() - int(ts)) < 300
        if not fresh or not any(
            hmac.compare_digest(expected, sig)
            for sig in request.headers["webhook-signature"].split()
        ):
            self.forged += 1
            return web.Response(status=401)
        async with self.changed:
            self.events.append(orjson.loads(body))
            self.changed.notify_all()
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner, url = await serve_app(app)
    rec.url = url + "/hook"
    yield rec
    await runner.cleanup()


async def test_crossing_50_80_100_percent_sends_one_signed_webhook_each(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
    receiver: Receiver,
) -> None:
    cfg = {
        **billing_config(fake_openai.url),
        "tiers": TIERS,
        "prices": PRICES,
        "budget_alerts": {"webhook": {"url": receiver.url, "secret": SECRET}},
    }
    gw = await start_gateway(cfg, database_url=pg_url, data_dir=tmp_path)
    tenant, key = await tenant_with_key(pg, tmp_path, "usd", set(TIERS))  # $0.0006: 10 requests
    for n in range(1, 11):
        assert (await _chat(gw, key["api_key"], 6))[0] == 200
        await wait_for(pg, SPENT, tenant, expect=60 * n)
    assert (await _chat(gw, key["api_key"], 6))[0] == 429
    async with asyncio.timeout(10), receiver.changed:
        await receiver.changed.wait_for(lambda: len(receiver.events) >= 3)
    assert receiver.forged == 0
    data = [e["data"] for e in receiver.events]
    assert [d["threshold_percent"] for d in data] == [50, 80, 100]
    assert {(d["scope"], d["tenant"], d["span"]) for d in data} == {("tenant", tenant, "month")}
    assert [d["used_usd"] for d in data] == ["0.000300", "0.000480", "0.000600"]
    assert all(e["type"] == "budget.threshold_crossed" for e in receiver.events)
