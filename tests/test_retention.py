"""A billed request's prompt and stream leave memory when it ends, not when its row lands.

Billing keeps every request in its crash journal until the ledger's batch
holding its usage row reaches Postgres (a ``kill -9`` meanwhile bills it from
the journal). That is the flush interval (20 ms by default) plus the batch's
write, longer while Postgres is slow or down (until the rows go to the
spool): dozens to thousands of finished requests wait at any moment. What
waits must be what the journal needs (the record: the row's columns and
usage), not the parsed chat history nor the stream's
relayed events, which only a request still running can need (its exact
prompt and completion counts at a checkpoint).

Here the ledger's interval is a minute, so every row is still queued when
the gateway's memory is searched: the gateway must hold none of the
requests' bodies or stream meters (the fake provider's own copies are
dropped first).
"""

from __future__ import annotations

import asyncio
import gc
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from proxy.core.metering import StreamMeter
from proxy.stores.ledger import Ledger
from proxy.web.keys import BILLING
from tests.billing_helpers import billing_config, tenant_with_key
from tests.conftest import Gateway, StartGateway
from tests.fakes import FakeOpenAI
from tests.waiting import until

REQUESTS = 24
HISTORY = "the user and the assistant talked at length about the weather " * 500  # ~32 KB


def _messages(mark: str, i: int) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": HISTORY},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": f"{mark}{i}"},
    ]


def _bodies_alive(mark: str, sent: list[list[dict[str, Any]]]) -> int:
    """Parsed bodies of the prompts sent with ``mark`` still in memory (not
    the test's own lists)."""
    gc.collect()
    ours = {id(m) for m in sent}
    found = 0
    for obj in gc.get_objects():
        if not isinstance(obj, dict):
            continue
        messages = obj.get("messages")
        if not isinstance(messages, list) or id(messages) in ours or not messages:
            continue
        last = messages[-1]
        if isinstance(last, dict) and str(last.get("content", "")).startswith(mark):
            found += 1
    return found


def _meters() -> list[StreamMeter]:
    gc.collect()
    return [obj for obj in gc.get_objects() if isinstance(obj, StreamMeter)]


def _new_meters(before: list[StreamMeter]) -> int:
    """Stream meters alive now that were not before (``before`` keeps the
    earlier ones alive, so no new one can reuse an old one's id)."""
    old = {id(m) for m in before}
    return sum(1 for m in _meters() if id(m) not in old)


async def _billed(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, pg: asyncpg.Pool, pg_url: str, tmp: Path
) -> tuple[Gateway, str]:
    config = billing_config(fake_openai.url, flush_interval_ms=60_000)
    gw = await start_gateway(config, database_url=pg_url, data_dir=tmp)
    _, key = await tenant_with_key(pg, tmp, "pro")
    return gw, key["api_key"]


async def _send(gw: Gateway, key: str, stream: bool) -> tuple[str, list[list[dict[str, Any]]]]:
    """``REQUESTS`` prompts at once, each ending in a marker no other test sends."""
    mark = f"retention-{uuid.uuid4().hex}-"
    sent = [_messages(mark, i) for i in range(REQUESTS)]

    async def one(s: aiohttp.ClientSession, messages: list[dict[str, Any]]) -> None:
        body = {"model": "fake-model", "messages": messages, "stream": stream}
        async with s.post(
            gw.base_url + "/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
        ) as r:
            assert r.status == 200, await r.text()
            await r.read()

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(one(s, m) for m in sent))
    return mark, sent


async def _all_settled(gw: Gateway, fake_openai: FakeOpenAI) -> Ledger:
    """Wait (bounded) until every request's row waits in the ledger, then drop
    the test's own references to the requests: the provider's copies and the
    test settler's list of records."""
    ledger = gw.app[BILLING].ledger
    await until(lambda: ledger.pending() >= REQUESTS, what="every row settled, queued")
    fake_openai.seen.clear()
    gw.settler.records.clear()
    return ledger


async def test_finished_requests_awaiting_the_ledger_hold_no_prompt(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg: asyncpg.Pool,
    pg_url: str,
    tmp_path: Path,
) -> None:
    gw, key = await _billed(start_gateway, fake_openai, pg, pg_url, tmp_path)
    mark, sent = await _send(gw, key, stream=False)
    ledger = await _all_settled(gw, fake_openai)
    # A handler may still be returning from its settle: bounded, not a sleep.
    await until(lambda: _bodies_alive(mark, sent) == 0, 2.0, 0.1, "no prompt held")
    assert ledger.pending() >= REQUESTS  # their rows still wait for the ledger


async def test_finished_streams_awaiting_the_ledger_hold_no_relayed_events(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg: asyncpg.Pool,
    pg_url: str,
    tmp_path: Path,
) -> None:
    gw, key = await _billed(start_gateway, fake_openai, pg, pg_url, tmp_path)
    before = _meters()
    mark, sent = await _send(gw, key, stream=True)
    ledger = await _all_settled(gw, fake_openai)
    await until(lambda: _new_meters(before) == 0, 2.0, 0.1, "no stream meter held")
    await until(lambda: _bodies_alive(mark, sent) == 0, 2.0, 0.1, "no prompt held")
    assert ledger.pending() >= REQUESTS
