"""The ledger: a row Postgres refuses never takes other rows with it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from proxy.core.tasks import TaskGroup
from proxy.stores.ledger import COLUMNS, Ledger, Spool, UsageRow
from proxy.web.keys import BILLING
from tests.billing_helpers import billing_config, tenant_with_key, wait_for
from tests.conftest import Gateway, StartGateway
from tests.db import unique
from tests.fakes import FAKE_USAGE, FakeOpenAI
from tests.fakes_faults import FaultyOpenAI
from tests.test_metrics import parse, scrape, value
from tests.usage_rows import usage_row
from tests.waiting import until

MSG = [{"role": "user", "content": "hi"}]
BY_TENANT = (
    "SELECT count(*) FROM usage_events e JOIN tenants t ON t.id = e.tenant_id WHERE t.name = $1"
)


async def _post(gw: Gateway, key: str, model: str, rid: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    if rid is not None:
        headers["x-request-id"] = rid
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.base_url + "/chat/completions",
            data=orjson.dumps({"model": model, "messages": MSG}),
            headers={**headers, "Content-Type": "application/json"},
        ) as r,
    ):
        return r.status, await r.json()


async def test_hostile_model_names_cost_no_other_tenant_a_row(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    gw = await start_gateway(
        billing_config(fake_openai.url), database_url=pg_url, data_dir=tmp_path
    )
    good, good_key = await tenant_with_key(pg, tmp_path, "pro")
    bad, bad_key = await tenant_with_key(pg, tmp_path, "pro")
    marker = unique("hostile")
    hostile = ["nope\u0000x", "fake-a\r\nx-evil: 1", "fake-" + "m" * 1_000_000, "fake-\u2028x"]

    async def attacker() -> list[tuple[int, Any]]:
        out = []
        for round_ in range(5):
            for i, model in enumerate(hostile):
                out.append(await _post(gw, bad_key["api_key"], model, f"{marker}-{round_}-{i}"))
        return out

    goods, bads = await asyncio.gather(
        asyncio.gather(*(_post(gw, good_key["api_key"], "fake-model") for _ in range(60))),
        attacker(),
    )
    assert [s for s, _ in goods] == [200] * 60
    for status, body in bads:  # refused at parse, in OpenAI's shape, naming the field
        assert status == 400, body
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["param"] == "model"
    # Every good request is billed exactly once, and the counters moved; the
    # hostile ones were refused before authentication: nothing to bill.
    await wait_for(pg, BY_TENANT, good, expect=60)
    assert await pg.fetchval(BY_TENANT, bad) == 0
    counter = await pg.fetchrow(
        "SELECT requests_used, tokens_used FROM quota_counters c JOIN tenants t"
        " ON t.id = c.tenant_id WHERE t.name = $1",
        good,
    )
    assert tuple(counter) == (60, 60 * FAKE_USAGE["total_tokens"])
    ledger = gw.app[BILLING].ledger
    assert ledger.healthy and ledger.spool.depth() == 0
    assert not (tmp_path / "dead-letter.jsonl").exists()  # nothing refused at all


def _row(tenant_id: int | None, request_id: str, **over: Any) -> UsageRow:
    values: dict[str, Any] = {
        "period": datetime.now(UTC).date().replace(day=1),
        "event_id": unique("ev"),
        "request_id": request_id,
        "tenant_id": tenant_id,
        "endpoint": "chat",
        "public_model": "fake-model",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "usage_source": "provider",
        "counted": tenant_id is not None,
        "cached": False,
        "stream": False,
        "client_disconnected": False,
        "status": 200,
        "attempts": 1,
        "cost_usd": Decimal("0.25"),
        **over,
    }
    return usage_row(values, leased=False)


def _refused_rows(marker: str) -> list[UsageRow]:
    """Rows Postgres refuses for their content: each kind of data error."""
    return [
        _row(None, f"{marker}-nul\u0000"),  # text with NUL
        _row(None, f"{marker}-json", details='{"x\\u0000": 1}'),  # jsonb with \u0000
        _row(None, f"{marker}-big", cost_usd=Decimal("1e20")),  # numeric(18, 8) overflow
    ]


async def _counter(pg: asyncpg.Pool, tenant_id: int) -> tuple[int, int]:
    row = await pg.fetchrow(
        "SELECT requests_used, tokens_used FROM quota_counters WHERE tenant_id = $1", tenant_id
    )
    return (row["requests_used"], row["tokens_used"]) if row else (0, 0)


async def test_a_refused_row_is_dead_lettered_and_its_batch_commits(
    pg: asyncpg.Pool, tmp_path: Path
) -> None:
    tenant, _ = await tenant_with_key(pg, tmp_path, "pro")
    tenant_id = await pg.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    ledger = Ledger(pg, Spool(tmp_path / "spool-w.jsonl"), "w-dead", 60, 30)
    marker = unique("batch")
    good = [_row(tenant_id, f"{marker}-good-{i}") for i in range(20)]
    for row in [*good[:7], *_refused_rows(marker), *good[7:]]:
        ledger.add(row)
    await ledger.flush()
    count = "SELECT count(*) FROM usage_events WHERE request_id LIKE $1"
    assert await pg.fetchval(count, marker + "-good-%") == 20
    assert await _counter(pg, tenant_id) == (20, 20 * 15)
    # Refused rows: kept aside with the reason, counted, never retried; the
    # database was up all along, so nothing is spooled and the ledger is healthy.
    assert ledger.dead_lettered == 3
    assert ledger.healthy and ledger.spool.depth() == 0 and ledger.pending() == 0
    dead = [
        orjson.loads(line) for line in (tmp_path / "dead-letter.jsonl").read_bytes().splitlines()
    ]
    assert sorted(d["row"]["v"][COLUMNS.index("request_id")] for d in dead) == sorted(
        r.values[COLUMNS.index("request_id")] for r in _refused_rows(marker)
    )
    assert all(d["error"] for d in dead)
    await ledger.flush()  # the next flush does not try them again
    assert ledger.dead_lettered == 3
    await ledger.close()


async def test_an_idle_flusher_sleeps_and_a_row_waits_at_most_the_interval(
    pg: asyncpg.Pool, tmp_path: Path
) -> None:
    """Every batch costs Postgres ~1 ms before its first row, so the flusher
    writes when the oldest row has waited the interval, and with nothing to
    write it does not wake at all (it used to flush an empty queue every
    interval)."""
    tenant, _ = await tenant_with_key(pg, tmp_path, "pro")
    tenant_id = await pg.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    ledger = Ledger(pg, Spool(tmp_path / "spool-idle.jsonl"), "w-idle", 0.05, 3600)
    flushes = 0
    flush = ledger.flush

    async def counted() -> None:
        nonlocal flushes
        flushes += 1
        await flush()

    ledger.flush = counted  # type: ignore[method-assign]
    tasks = TaskGroup()
    task = tasks.spawn(ledger.run())
    try:
        await until(lambda: flushes == 1, what="the first round (the leases' heartbeat)")
        # A window of ten intervals in which nothing may happen (the
        # behaviour under test, not a wait for something).
        await asyncio.sleep(0.5)
        assert flushes == 1
        marker = unique("idle")
        ledger.add(_row(tenant_id, f"{marker}-1"))
        ledger.add(_row(tenant_id, f"{marker}-2"))
        count = "SELECT count(*) FROM usage_events WHERE request_id LIKE $1"
        await until(lambda: pg.fetchval(count, marker + "-%"), what="the rows landed")
        assert await pg.fetchval(count, marker + "-%") == 2  # in one batch
        assert flushes == 2 and ledger.pending() == 0
    finally:
        ledger.stop()
        await task
        await ledger.close()


async def test_a_refused_row_in_a_spool_does_not_block_its_replay(
    pg: asyncpg.Pool, tmp_path: Path
) -> None:
    """A spool written by an older version may hold a row Postgres refuses:
    the replay writes the rest, dead-letters it, and clears the spool."""
    tenant, _ = await tenant_with_key(pg, tmp_path, "pro")
    tenant_id = await pg.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    marker = unique("spooled")
    orphan = Spool(tmp_path / "spool-dead-worker.jsonl")
    orphan.append([_row(tenant_id, f"{marker}-good-{i}") for i in range(5)])
    orphan.append(_refused_rows(marker))
    orphan.release()
    ledger = Ledger(pg, Spool(tmp_path / "spool-w2.jsonl"), "w-replay", 60, 30)
    assert await ledger.replay_orphans(tmp_path) == 5
    assert not orphan.path.exists()
    mine = ledger.spool
    mine.append([_row(tenant_id, f"{marker}-mine-{i}") for i in range(4)])
    mine.append(_refused_rows(marker + "-mine"))
    await ledger.flush()
    assert mine.depth() == 0 and ledger.healthy
    count = "SELECT count(*) FROM usage_events WHERE request_id LIKE $1"
    assert await pg.fetchval(count, marker + "-good-%") == 5
    assert await pg.fetchval(count, marker + "-mine-%") == 4
    assert await _counter(pg, tenant_id) == (9, 9 * 15)
    assert ledger.dead_lettered == 6
    await ledger.close()


async def test_provider_usage_with_a_nul_is_billed_and_a_refusal_is_counted(
    start_gateway: StartGateway, pg_url: str, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    """A provider's usage object is not ours to trust either: its row lands.
    A row refused all the same shows on ``/metrics``."""
    fake = await FaultyOpenAI().start()
    try:
        gw = await start_gateway(billing_config(fake.url), database_url=pg_url, data_dir=tmp_path)
        tenant, key = await tenant_with_key(pg, tmp_path, "pro")
        status, _ = await _post(gw, key["api_key"], "fake-usage-nul")
        assert status == 200
        await wait_for(pg, BY_TENANT, tenant, expect=1)
        details = await pg.fetchval(
            "SELECT e.details FROM usage_events e JOIN tenants t ON t.id = e.tenant_id"
            " WHERE t.name = $1",
            tenant,
        )
        assert orjson.loads(details) == {"cached_tokens": 2, "odd?key": 3}
        ledger = gw.app[BILLING].ledger
        ledger.add(_refused_rows(unique("gw"))[0])
        await ledger.flush()
        _, series = parse(await scrape(gw))
        assert value(series, "tollway_billing_dead_letter_total") == 1
        assert ledger.healthy and ledger.spool.depth() == 0
    finally:
        await fake.close()
