"""Tenant job events: the durable log, its signed webhooks, and ``GET /v1/events``.

Real Postgres (LISTEN/NOTIFY included), real sockets: webhook receivers are
small aiohttp servers on 127.0.0.1, and every signature is checked with the
Standard Webhooks reference library and the ``openai`` SDK, not with our own
signing code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest
import standardwebhooks
from aiohttp import WSMsgType, web
from openai.types.webhooks import BatchCompletedWebhookEvent

from proxy.config import sealed
from proxy.config.sealed import MASTER_KEY_ENV
from proxy.stores import webhooks
from proxy.stores.events import EventLog
from proxy.web.keys import DELIVERER, EVENTS
from tests.billing_helpers import billing_config, tenant_with_key
from tests.conftest import Gateway, StartGateway
from tests.fakes import FakeOpenAI
from tests.loopback import serve_app
from tests.test_metrics import parse, scrape, value
from tests.waiting import until

ROOT = Path(__file__).resolve().parents[1]


def _batch(batch_id: str, status: str, completed: int = 0, total: int = 3) -> dict[str, Any]:
    """An OpenAI ``Batch`` object, as the batch workers hand it to the sink."""
    return {
        "id": batch_id,
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "status": status,
        "request_counts": {"total": total, "completed": completed, "failed": 0},
    }


@dataclass
class Receiver:
    """A webhook endpoint: answers each POST with the next status of ``script``
    (then 200), and keeps what it received."""

    script: list[int] = field(default_factory=list)
    got: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)
    redirected: list[bytes] = field(default_factory=list)
    url: str = ""

    async def hook(self, request: web.Request) -> web.Response:
        self.got.append((await request.read(), dict(request.headers)))
        status = self.script.pop(0) if self.script else 200
        if 300 <= status < 400:
            return web.Response(status=status, headers={"Location": self.url + "/elsewhere"})
        return web.Response(status=status, text="ok" if status < 300 else "no")

    async def elsewhere(self, request: web.Request) -> web.Response:
        self.redirected.append(await request.read())
        return web.Response(text="ok")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.hook)
    app.router.add_post("/elsewhere", rec.elsewhere)
    runner, rec.url = await serve_app(app)
    yield rec
    await runner.cleanup()


def _config(provider_url: str, **events: Any) -> dict[str, Any]:
    cfg = billing_config(provider_url)
    cfg["events"] = {"webhooks": {"backoff_s": 0.05, "timeout_s": 2}, **events}
    return cfg


@dataclass
class Tenant:
    name: str
    id: int
    key: str


async def _tenant(pool: asyncpg.Pool, data_dir: Path) -> Tenant:
    name, key = await tenant_with_key(pool, data_dir, "pro")
    tid = await pool.fetchval("SELECT id FROM tenants WHERE name = $1", name)
    return Tenant(name, tid, key["api_key"])


StartEvents = Callable[..., Awaitable[Gateway]]


@pytest.fixture
def start(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, pg_url: str, tmp_path: Path
) -> StartEvents:
    """Starts a gateway on the session's Postgres: ``_config`` with the
    ``events.stream`` settings given, and ``events.webhooks`` keys over its own."""

    async def go(stream: dict[str, Any] | None = None, **webhook_settings: Any) -> Gateway:
        cfg = _config(fake_openai.url, **({"stream": stream} if stream else {}))
        cfg["events"]["webhooks"].update(webhook_settings)
        return await start_gateway(cfg, database_url=pg_url, data_dir=tmp_path)

    return go


@pytest.fixture
async def gw(start: StartEvents) -> Gateway:
    return await start()


async def _endpoint(
    pg: asyncpg.Pool, t: Tenant, receiver: Receiver, types: list[str] | None = None
) -> dict[str, Any]:
    """``t``'s webhook endpoint at ``receiver`` (every event type unless ``types``)."""
    return await webhooks.add_endpoint(pg, t.name, receiver.url + "/hook", types, None, "test")


def _log(gw: Gateway) -> EventLog:
    log = gw.app[EVENTS]
    assert isinstance(log, EventLog)
    return log


# -- webhooks ---------------------------------------------------------------


async def test_webhook_is_signed_in_openais_shape_and_verifies_independently(
    gw: Gateway, pg: asyncpg.Pool, tmp_path: Path, receiver: Receiver
) -> None:
    t = await _tenant(pg, tmp_path)
    hook = await _endpoint(pg, t, receiver)
    secret = hook["secret"]
    log = _log(gw)
    await log.publish(t.id, "batch.in_progress", _batch("batch_abc", "in_progress"))
    await log.publish(t.id, "batch.progress", _batch("batch_abc", "in_progress", 2))
    await log.publish(t.id, "batch.completed", _batch("batch_abc", "completed", 3))
    await until(lambda: receiver.got, what="the webhook arrived")

    body, headers = receiver.got[0]
    # The reference implementation of Standard Webhooks accepts it...
    payload = standardwebhooks.Webhook(secret).verify(body, headers)
    assert payload == {
        "id": payload["id"],
        "object": "event",
        "type": "batch.completed",
        "created_at": payload["created_at"],
        "data": {"id": "batch_abc"},
    }
    assert payload["id"].startswith("evt_") and headers["webhook-id"] == payload["id"]
    # ...and so does OpenAI's own SDK, which parses it as its batch event.
    event = openai.OpenAI(api_key="unused").webhooks.unwrap(body, headers, secret=secret)
    assert isinstance(event, BatchCompletedWebhookEvent)
    assert event.data.id == "batch_abc" and event.type == "batch.completed"
    # A tampered body or another secret is refused.
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(body.replace(b"abc", b"abd"), headers)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(webhooks.new_secret()).verify(body, headers)
    # Progress events are for the stream only: nothing else was sent.
    await log.publish(t.id, "batch.failed", _batch("batch_zzz", "failed"))
    await until(lambda: len(receiver.got) == 2, what="the second webhook")
    types = [json.loads(b)["type"] for b, _ in receiver.got]
    assert types == ["batch.completed", "batch.failed"]


async def test_a_failing_receiver_gets_retries_with_backoff_each_recorded(
    gw: Gateway, pg: asyncpg.Pool, tmp_path: Path, receiver: Receiver
) -> None:
    t = await _tenant(pg, tmp_path)
    hook = await _endpoint(pg, t, receiver, ["batch.expired"])
    receiver.script = [500, 503]
    await _log(gw).publish(t.id, "batch.expired", _batch("batch_e", "expired"))
    await until(lambda: len(receiver.got) == 3, what="three attempts")

    rows = await _attempts(pg, hook["id"])
    await until(lambda: _delivered(pg, hook["id"]), what="the delivery recorded as delivered")
    rows = await _attempts(pg, hook["id"])
    assert [(r["attempt"], r["status_code"]) for r in rows] == [(1, 500), (2, 503), (3, 200)]
    assert rows[0]["error"] == "HTTP 500" and rows[2]["error"] is None
    assert rows[0]["next_at"] is not None and rows[2]["delivered_at"] is not None
    # The backoff doubled: the third attempt waited longer than the second.
    gap1 = (rows[1]["attempted_at"] - rows[0]["attempted_at"]).total_seconds()
    gap2 = (rows[2]["attempted_at"] - rows[1]["attempted_at"]).total_seconds()
    assert gap1 >= 0.05 and gap2 >= 0.1
    # One message: every retry carries the same webhook-id, each one signed anew.
    ids = {h["webhook-id"] for _, h in receiver.got}
    assert len(ids) == 1
    for body, headers in receiver.got:
        standardwebhooks.Webhook(hook["secret"]).verify(body, headers)


async def _attempts(pg: asyncpg.Pool, endpoint: str) -> list[asyncpg.Record]:
    return list(
        await pg.fetch(
            "SELECT * FROM webhook_attempts WHERE endpoint_id = $1 ORDER BY attempt", endpoint
        )
    )


async def _delivered(pg: asyncpg.Pool, endpoint: str) -> bool:
    state = await pg.fetchval(
        "SELECT state FROM webhook_deliveries WHERE endpoint_id = $1", endpoint
    )
    return bool(state == "delivered")


async def test_redirects_are_not_followed_and_attempts_are_bounded(
    start: StartEvents,
    pg: asyncpg.Pool,
    tmp_path: Path,
    receiver: Receiver,
) -> None:
    gw = await start(max_attempts=2)
    t = await _tenant(pg, tmp_path)
    hook = await _endpoint(pg, t, receiver)
    receiver.script = [307, 307, 307]
    await _log(gw).publish(t.id, "batch.cancelled", _batch("batch_c", "cancelled"))

    async def failed() -> bool:
        state = await pg.fetchval(
            "SELECT state FROM webhook_deliveries WHERE endpoint_id = $1", hook["id"]
        )
        return bool(state == "failed")

    await until(failed, what="the delivery given up after max_attempts")
    rows = await _attempts(pg, hook["id"])
    assert [r["status_code"] for r in rows] == [307, 307]
    assert "redirects are not followed" in rows[0]["error"]
    assert rows[1]["next_at"] is None  # no attempt left
    assert receiver.redirected == []  # the signed event never went to the redirect target


async def test_pending_deliveries_survive_a_restart(
    start: StartEvents,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
    receiver: Receiver,
) -> None:
    """An event stored while no gateway runs (or one that died before
    sending) is delivered by the next worker that starts."""
    t = await _tenant(pg, tmp_path)
    hook = await _endpoint(pg, t, receiver)
    # Published with no deliverer running: only the rows exist.
    event = await EventLog(pg, pg_url).record(t.id, "batch.completed", _batch("batch_r", "done"))
    assert (
        await pg.fetchval("SELECT state FROM webhook_deliveries WHERE event_id = $1", event.id)
        == "pending"
    )
    await start()
    await until(lambda: receiver.got, what="the pending delivery sent after the start")
    body, headers = receiver.got[0]
    assert standardwebhooks.Webhook(hook["secret"]).verify(body, headers)["id"] == event.event_id
    await until(lambda: _delivered(pg, hook["id"]), what="recorded as delivered")


async def test_deliveries_streams_and_events_are_in_the_metrics(
    start: StartEvents,
    pg: asyncpg.Pool,
    tmp_path: Path,
    receiver: Receiver,
) -> None:
    """What an operator alerts on (deploy/METRICS.md): each attempt by outcome
    and timed, the queue of pending deliveries, open streams, events by type."""
    # The database outlives each test: no other test's unfinished delivery may
    # be sent (and counted) by this gateway.
    await pg.execute("DELETE FROM webhook_deliveries WHERE state = 'pending'")
    gw = await start(max_attempts=2, backoff_s=60)
    t = await _tenant(pg, tmp_path)
    hook = await _endpoint(pg, t, receiver)
    log = _log(gw)

    async def metric(name: str, **labels: str) -> float:
        return value(parse(await scrape(gw))[1], name, **labels)

    assert await metric("tollway_webhook_deliveries_total", outcome="failed") == 0
    receiver.script = [500]
    await log.publish(t.id, "batch.expired", _batch("batch_x", "expired"))
    await log.publish(t.id, "batch.progress", _batch("batch_y", "in_progress", 1))
    await until(lambda: len(receiver.got) == 1, what="the first attempt")
    await until(
        lambda: _metric_is(gw, "tollway_webhook_deliveries_total", 1, outcome="retried"),
        what="the attempt counted as retried",
    )
    assert await metric("tollway_webhook_deliveries_pending") == 1  # its retry waits a minute
    await log.publish(t.id, "batch.completed", _batch("batch_y", "completed", 3))
    await until(
        lambda: _metric_is(gw, "tollway_webhook_deliveries_total", 1, outcome="delivered"),
        what="the completed event delivered",
    )
    # The retry's backoff has passed: the second 500 is the last attempt.
    receiver.script = [500]
    await pg.execute(
        "UPDATE webhook_deliveries SET next_at = now()"
        " WHERE endpoint_id = $1 AND state = 'pending'",
        hook["id"],
    )
    gw.app[DELIVERER].wake()
    await until(
        lambda: _metric_is(gw, "tollway_webhook_deliveries_total", 1, outcome="failed"),
        what="the delivery counted as failed",
    )
    _, series = parse(await scrape(gw))
    assert value(series, "tollway_webhook_deliveries_total", outcome="delivered") == 1
    assert value(series, "tollway_webhook_deliveries_total", outcome="retried") == 1
    assert value(series, "tollway_webhook_delivery_seconds_count") == 3
    assert value(series, "tollway_webhook_deliveries_pending") == 0
    published = {ls["type"]: v for n, ls, v in series if n == "tollway_events_published_total"}
    assert published == {"batch.expired": 1, "batch.progress": 1, "batch.completed": 1}
    assert value(series, "tollway_event_streams_open") == 0
    auth = {"Authorization": f"Bearer {t.key}"}
    async with aiohttp.ClientSession() as s, s.ws_connect(_ws_url(gw), headers=auth):
        await _subscribed(gw, t.id)
        assert await metric("tollway_event_streams_open") == 1
    await _subscribed(gw, t.id, 0)
    assert await metric("tollway_event_streams_open") == 0


async def _metric_is(gw: Gateway, name: str, expected: float, **labels: str) -> bool:
    return value(parse(await scrape(gw))[1], name, **labels) == expected


async def test_secrets_are_sealed_at_rest_and_old_plaintext_rows_keep_working(
    start: StartEvents,
    pg: asyncpg.Pool,
    tmp_path: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With TOLLWAY_MASTER_KEY set, a dump of webhook_endpoints does not hold
    the secrets; a row stored in plaintext before is sealed at the start and
    both endpoints' webhooks still verify with the secrets shown at add."""
    monkeypatch.delenv(MASTER_KEY_ENV, raising=False)
    t = await _tenant(pg, tmp_path)
    old = await _endpoint(pg, t, receiver)
    dump = await pg.fetchval("SELECT secret FROM webhook_endpoints WHERE id = $1", old["id"])
    assert dump == old["secret"]  # no key: stored as it is (the state before the key)
    monkeypatch.setenv(MASTER_KEY_ENV, sealed.new_key())
    gw = await start()
    new = await _endpoint(pg, t, receiver)
    rows = await pg.fetch(
        "SELECT secret FROM webhook_endpoints WHERE id = ANY($1)", [old["id"], new["id"]]
    )
    for row in rows:
        for hook in (old, new):
            assert hook["secret"].removeprefix("whsec_") not in row["secret"]
        assert row["secret"].startswith("enc:")
    await _log(gw).publish(t.id, "batch.completed", _batch("batch_s", "completed", 3))
    await until(lambda: len(receiver.got) == 2, what="both endpoints' webhooks")
    verified = set()
    for body, headers in receiver.got:
        for hook in (old, new):
            with contextlib.suppress(standardwebhooks.WebhookVerificationError):
                standardwebhooks.Webhook(hook["secret"]).verify(body, headers)
                verified.add(hook["id"])
    assert verified == {old["id"], new["id"]}


async def test_a_secret_sealed_with_another_key_fails_its_delivery_plainly(
    start: StartEvents,
    pg: asyncpg.Pool,
    tmp_path: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(MASTER_KEY_ENV, sealed.new_key())
    t = await _tenant(pg, tmp_path)
    hook = await _endpoint(pg, t, receiver)
    monkeypatch.setenv(MASTER_KEY_ENV, sealed.new_key())  # the key was changed
    gw = await start(max_attempts=1)
    await _log(gw).publish(t.id, "batch.failed", _batch("batch_k", "failed"))
    await until(lambda: _attempts(pg, hook["id"]), what="the attempt recorded")
    (row,) = await _attempts(pg, hook["id"])
    assert "cannot be decrypted with TOLLWAY_MASTER_KEY" in row["error"]
    assert receiver.got == []  # nothing unsigned (or wrongly signed) was sent


# -- the stream -------------------------------------------------------------


def _ws_url(gw: Gateway, after: int | None = None) -> str:
    url = gw.url.replace("http://", "ws://") + "/v1/events"
    return url if after is None else f"{url}?after={after}"


async def _receive(ws: aiohttp.ClientWebSocketResponse, n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while len(out) < n:
            msg = await ws.receive()
            assert msg.type == WSMsgType.TEXT, msg
            out.append(json.loads(msg.data))
    return out


async def _subscribed(gw: Gateway, tenant: int, n: int = 1) -> None:
    await until(lambda: _log(gw).subscribers(tenant) == n, what=f"{n} stream(s) subscribed")


async def test_stream_sends_progress_and_completion_then_resumes_from_its_cursor(
    gw: Gateway, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    t = await _tenant(pg, tmp_path)
    log = _log(gw)
    auth = {"Authorization": f"Bearer {t.key}"}
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(_ws_url(gw), headers=auth) as ws:
            assert ws._response.headers["x-request-id"].startswith("req_")
            await _subscribed(gw, t.id)
            await log.publish(t.id, "batch.in_progress", _batch("batch_1", "in_progress"))
            await log.publish(t.id, "batch.progress", _batch("batch_1", "in_progress", 2))
            await log.publish(t.id, "batch.completed", _batch("batch_1", "completed", 3))
            got = await _receive(ws, 3)
        assert [m["type"] for m in got] == [
            "batch.in_progress",
            "batch.progress",
            "batch.completed",
        ]
        assert got[1]["data"]["request_counts"]["completed"] == 2
        assert got[2]["data"]["status"] == "completed"
        assert got[0]["id"] < got[1]["id"] < got[2]["id"]
        assert set(got[0]) == {"id", "event_id", "type", "created_at", "data"}
        cursor = got[-1]["id"]

        # Disconnected: these are missed, then found again with the cursor.
        await until(lambda: log.subscribers(t.id) == 0, what="the stream closed")
        await log.publish(t.id, "batch.in_progress", _batch("batch_2", "in_progress"))
        await log.publish(t.id, "batch.failed", _batch("batch_2", "failed"))
        async with s.ws_connect(_ws_url(gw, cursor), headers=auth) as ws:
            missed = await _receive(ws, 2)
            assert [(m["type"], m["data"]["id"]) for m in missed] == [
                ("batch.in_progress", "batch_2"),
                ("batch.failed", "batch_2"),
            ]
            # ...and it goes on live, with nothing repeated.
            await log.publish(t.id, "batch.cancelled", _batch("batch_3", "cancelled"))
            live = await _receive(ws, 1)
            assert live[0]["data"]["id"] == "batch_3" and live[0]["id"] > missed[-1]["id"]
        # Last-Event-ID works like ?after=.
        async with s.ws_connect(
            _ws_url(gw), headers={**auth, "Last-Event-ID": str(missed[-1]["id"])}
        ) as ws:
            assert [m["data"]["id"] for m in await _receive(ws, 1)] == ["batch_3"]


async def test_stream_is_tenant_scoped(gw: Gateway, pg: asyncpg.Pool, tmp_path: Path) -> None:
    a, b = await _tenant(pg, tmp_path), await _tenant(pg, tmp_path)
    log = _log(gw)
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(_ws_url(gw, 0), headers={"Authorization": f"Bearer {a.key}"}) as ws,
    ):
        await _subscribed(gw, a.id)
        await log.publish(b.id, "batch.completed", _batch("batch_of_b", "completed"))
        await log.publish(a.id, "batch.completed", _batch("batch_of_a", "completed"))
        got = await _receive(ws, 1)
        assert got[0]["data"]["id"] == "batch_of_a"
        # From cursor 0 the replay holds only a's events too.
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(_ws_url(gw, 0), headers={"Authorization": f"Bearer {a.key}"}) as ws,
    ):
        got = await _receive(ws, 1)
        assert got[0]["data"]["id"] == "batch_of_a"
        await log.publish(a.id, "batch.failed", _batch("batch_of_a2", "failed"))
        assert (await _receive(ws, 1))[0]["data"]["id"] == "batch_of_a2"


async def test_a_bad_key_is_refused_before_the_upgrade(gw: Gateway) -> None:
    upgrade = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    async with aiohttp.ClientSession() as s:
        for auth in ({"Authorization": "Bearer tw-" + "x" * 43}, {}):
            async with s.get(gw.url + "/v1/events", headers={**upgrade, **auth}) as r:
                assert r.status == 401
                assert (await r.json())["error"]["code"] == "invalid_api_key"
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await s.ws_connect(_ws_url(gw), headers={"Authorization": "Bearer nope"})
        assert exc.value.status == 401


async def test_bad_cursor_and_plain_get_are_400(
    gw: Gateway, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    t = await _tenant(pg, tmp_path)
    auth = {"Authorization": f"Bearer {t.key}"}
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await s.ws_connect(_ws_url(gw) + "?after=-1", headers=auth)
        assert exc.value.status == 400
        async with s.get(gw.url + "/v1/events", headers=auth) as r:
            assert r.status == 400 and "WebSocket" in (await r.json())["error"]["message"]


async def test_events_from_another_process_arrive_live(
    gw: Gateway, pg: asyncpg.Pool, pg_url: str, tmp_path: Path
) -> None:
    """Another worker (here another OS process, its own connection) publishes;
    Postgres NOTIFY brings it to this worker's stream."""
    t = await _tenant(pg, tmp_path)
    script = (
        "import asyncio, asyncpg, sys\n"
        "from proxy.stores.events import EventLog\n"
        "async def main():\n"
        "    pool = await asyncpg.create_pool(sys.argv[1], min_size=1, max_size=1)\n"
        "    await EventLog(pool, sys.argv[1]).publish(int(sys.argv[2]), 'batch.completed',"
        " {'id': 'batch_elsewhere'})\n"
        "    await pool.close()\n"
        "asyncio.run(main())\n"
    )
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(_ws_url(gw), headers={"Authorization": f"Bearer {t.key}"}) as ws,
    ):
        await _subscribed(gw, t.id)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, pg_url, str(t.id), cwd=ROOT
        )
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        got = await _receive(ws, 1)
        assert got[0]["data"] == {"id": "batch_elsewhere"}


async def test_a_dropped_listen_connection_loses_no_event(
    gw: Gateway, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    """Postgres drops the worker's LISTEN connection (a restart, a failover, an
    idle-killer): what is published meanwhile still reaches the stream, read
    from the log once the worker listens again."""
    t = await _tenant(pg, tmp_path)
    log = _log(gw)
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(_ws_url(gw), headers={"Authorization": f"Bearer {t.key}"}) as ws,
    ):
        await _subscribed(gw, t.id)
        await until(log.listening.is_set, what="listening")
        assert log._listener is not None
        pid = log._listener.get_server_pid()
        await pg.execute("SELECT pg_terminate_backend($1)", pid)
        await until(lambda: not log.listening.is_set(), what="the drop noticed")
        # Published before the worker listens again (it waits 1 s to reconnect):
        # its notification goes nowhere; the catch-up read finds the event.
        await EventLog(pg, "unused").publish(t.id, "batch.completed", {"id": "batch_gap"})
        got = await _receive(ws, 1)
        assert got[0]["data"] == {"id": "batch_gap"}
        assert log._listener.get_server_pid() != pid


async def test_a_client_that_falls_behind_is_closed_with_4008_and_resumes(
    start: StartEvents,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    gw = await start(stream={"send_queue": 2})
    t = await _tenant(pg, tmp_path)
    auth = {"Authorization": f"Bearer {t.key}"}
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(_ws_url(gw), headers=auth) as ws:
            await _subscribed(gw, t.id)
            # Five events committed at once (as a busy writer would): the
            # worker reads them in one go, more than the queue of 2 holds.
            async with pg.acquire() as conn, conn.transaction():
                for i in range(5):
                    await conn.execute(
                        "INSERT INTO tenant_events (tenant_id, event_id, type, data)"
                        " VALUES ($1, $2, 'batch.progress', $3::jsonb)",
                        t.id,
                        f"evt_burst{i}_{t.id}",
                        json.dumps({"id": f"batch_{i}"}),
                    )
                await conn.execute("SELECT pg_notify('tollway_events', $1)", f"{t.id}:0")
            async with asyncio.timeout(10):
                msg = await ws.receive()
                while msg.type == WSMsgType.TEXT:
                    msg = await ws.receive()
            # The code the server's close frame carries (``ws.close_code`` may
            # read 1006 instead when the server drops the socket first).
            assert msg.type == WSMsgType.CLOSE and msg.data == 4008
            assert "resume with ?after=" in str(msg.extra)
        async with s.ws_connect(_ws_url(gw, 0), headers=auth) as ws:
            got = await _receive(ws, 5)
            assert [m["data"]["id"] for m in got] == [f"batch_{i}" for i in range(5)]


async def test_streams_per_tenant_are_capped(
    start: StartEvents,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    gw = await start(stream={"max_connections_per_tenant": 1})
    t, other = await _tenant(pg, tmp_path), await _tenant(pg, tmp_path)
    async with aiohttp.ClientSession() as s:
        auth = {"Authorization": f"Bearer {t.key}"}
        async with s.ws_connect(_ws_url(gw), headers=auth):
            await _subscribed(gw, t.id)
            with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
                await s.ws_connect(_ws_url(gw), headers=auth)
            assert exc.value.status == 429
            # Another tenant has its own allowance.
            async with s.ws_connect(_ws_url(gw), headers={"Authorization": f"Bearer {other.key}"}):
                await _subscribed(gw, other.id)


async def test_shutdown_closes_streams_with_going_away(
    gw: Gateway, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    t = await _tenant(pg, tmp_path)
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(_ws_url(gw), headers={"Authorization": f"Bearer {t.key}"}) as ws,
    ):
        await _subscribed(gw, t.id)
        async with asyncio.timeout(20):
            _, msg = await asyncio.gather(gw.runner.cleanup(), ws.receive())
        assert msg.type == WSMsgType.CLOSE and msg.data == 1001
        assert "resume with ?after=" in str(msg.extra)


# -- retention and management -------------------------------------------------


async def test_retention_sweep_deletes_old_events_and_their_deliveries(
    gw: Gateway, pg: asyncpg.Pool, tmp_path: Path, receiver: Receiver
) -> None:
    t = await _tenant(pg, tmp_path)
    await _endpoint(pg, t, receiver)
    log = _log(gw)
    old = await log.record(t.id, "batch.completed", _batch("batch_old", "completed"))
    new = await log.record(t.id, "batch.completed", _batch("batch_new", "completed"))
    await pg.execute(
        "UPDATE tenant_events SET created_at = now() - interval '40 days' WHERE id = $1", old.id
    )
    assert await log.sweep(30 * 86400) >= 1
    left = await pg.fetch("SELECT id FROM tenant_events WHERE tenant_id = $1", t.id)
    assert [r["id"] for r in left] == [new.id]
    assert not await pg.fetchval(
        "SELECT count(*) FROM webhook_deliveries WHERE event_id = $1", old.id
    )


async def test_admin_api_manages_webhooks_and_shows_deliveries(
    start: StartEvents,
    pg: asyncpg.Pool,
    tmp_path: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOLLWAY_ADMIN_KEY", "admin-canary-7d1f")
    gw = await start()
    t = await _tenant(pg, tmp_path)
    base = f"{gw.url}/admin/tenants/{t.name}/webhooks"
    admin = {"Authorization": "Bearer admin-canary-7d1f"}
    async with aiohttp.ClientSession(headers=admin) as s:
        bad = {"url": receiver.url + "/hook", "event_types": ["batch.progress"]}
        async with s.post(base, json=bad) as r:
            assert r.status == 400 and "batch.progress" in (await r.json())["error"]["message"]
        async with s.post(base, json={"url": receiver.url + "/hook"}) as r:
            assert r.status == 201
            made = await r.json()
        assert made["secret"].startswith("whsec_") and made["tenant"] == t.name
        async with s.get(base) as r:
            listed = (await r.json())["data"]
        assert [e["id"] for e in listed] == [made["id"]] and "secret" not in listed[0]
        await _log(gw).publish(t.id, "batch.completed", _batch("batch_a", "completed"))
        await until(lambda: _delivered(pg, made["id"]), what="delivered")
        async with s.get(f"{base}/{made['id']}/deliveries") as r:
            shown = (await r.json())["data"]
        assert shown[0]["state"] == "delivered" and shown[0]["type"] == "batch.completed"
        assert shown[0]["attempt_log"][0]["status_code"] == 200
        async with s.delete(f"{base}/{made['id']}") as r:
            assert r.status == 200
        async with s.get(base) as r:
            assert (await r.json())["data"] == []
    audit = await pg.fetch(
        "SELECT action, after::text, before::text FROM audit_log WHERE target = $1"
        " AND action LIKE 'webhook.%' ORDER BY id",
        t.name,
    )
    assert [a["action"] for a in audit] == ["webhook.add", "webhook.remove"]
    assert all(made["secret"] not in str(dict(a)) for a in audit)  # never audited


async def test_cli_adds_lists_and_removes_webhooks(
    pg_url: str, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    t = await _tenant(pg, tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "TOLLWAY_DATA_DIR")}
    env.update(DATABASE_URL=pg_url, TOLLWAY_DATA_DIR=str(tmp_path))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    added = await asyncio.to_thread(
        run, "webhooks", "add", "--tenant", t.name, "--url", "https://hooks.example/x",
        "--events", "batch.completed,batch.failed", "--json",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    row = json.loads(added.stdout.split("\nThis is the only time")[0])
    assert row["event_types"] == ["batch.completed", "batch.failed"]
    assert row["secret"].startswith("whsec_")
    listed = await asyncio.to_thread(run, "webhooks", "list", "--tenant", t.name)
    assert row["id"] in listed.stdout and row["secret"] not in listed.stdout
    bad = await asyncio.to_thread(run, "webhooks", "add", "--tenant", t.name, "--url", "ftp://x")
    assert bad.returncode != 0 and "http(s) URL" in bad.stderr
    assert (await asyncio.to_thread(run, "webhooks", "remove", row["id"])).returncode == 0
    assert not await pg.fetchval("SELECT count(*) FROM webhook_endpoints WHERE id = $1", row["id"])
