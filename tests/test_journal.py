"""A worker killed with streams in flight: every admitted request still gets its row.

The real ``tollway serve`` against a provider that trickles tokens forever;
the process is SIGKILLed with 20 streams open, started again on the same
data directory, and the new one bills the 20 from the dead one's journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from proxy.core.tasks import TaskGroup
from tests.billing_helpers import billing_config, tenant_with_key
from tests.loopback import serve_app
from tests.test_supervisor import Tollway, tollway  # noqa: F401 - the fixture
from tests.waiting import until

MSG = [{"role": "user", "content": "hi"}]
STREAMS = 20


class Trickle:
    """An OpenAI-style provider that streams one token (" tok") per 50 ms, forever,
    and counts what it sent per request id."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> Trickle:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner, url = await serve_app(app, handler_cancellation=True)
        self.url = url + "/v1"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        rid = request.headers["X-Request-Id"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(100_000):  # bounded: ~80 minutes, cut long before
            chunk = {
                "id": "chatcmpl-trickle",
                "object": "chat.completion.chunk",
                "model": "trickle",
                "choices": [{"index": 0, "delta": {"content": " tok"}, "finish_reason": None}],
            }
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            self.sent[rid] += 1
            await asyncio.sleep(0.05)  # the behaviour: a provider trickling tokens
        return resp


@pytest.fixture
async def trickle() -> AsyncIterator[Trickle]:
    fake = await Trickle().start()
    yield fake
    await fake.close()


async def _read_until_killed(resp: aiohttp.ClientResponse, got: list[int]) -> None:
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
        async for line in resp.content:
            if line.startswith(b"data: "):
                got.append(1)


async def test_sigkill_with_streams_in_flight_bills_every_request_as_interrupted(
    tollway: Any,  # noqa: F811 - the fixture
    trickle: Trickle,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    cfg = billing_config(trickle.url)
    cfg["models"] = [{"name": "trickle", "targets": [{"provider": "fake"}]}]
    cfg["prices"] = {"trickle": {"prompt": 1.0, "completion": 2.0}}
    tenant, key = await tenant_with_key(pg, tmp_path, "pro")
    t: Tollway = await tollway(cfg)
    auth = {"Authorization": f"Bearer {key['api_key']}"}
    body = {"model": "trickle", "messages": MSG, "stream": True}
    got: list[list[int]] = [[] for _ in range(STREAMS)]
    async with aiohttp.ClientSession() as s:
        responses = [
            await s.post(t.url + "/v1/chat/completions", json=body, headers=auth)
            for _ in range(STREAMS)
        ]
        assert all(r.status == 200 for r in responses)
        ids = [r.headers["x-request-id"] for r in responses]
        tasks = TaskGroup()
        readers = [
            tasks.spawn(_read_until_killed(r, g)) for r, g in zip(responses, got, strict=True)
        ]
        # every stream well past its first checkpoint (each second)
        await until(lambda: min(len(g) for g in got) >= 40, 20, interval=0.05)
        t.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*readers), 10)
    await t.proc.wait()
    (journal,) = tmp_path.glob("journal-*.jsonl")  # noqa: ASYNC240 - a test's own file
    lines = journal.read_bytes()
    tenant_id = await pg.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    assert (
        await pg.fetchval("SELECT count(*) FROM usage_events WHERE tenant_id = $1", tenant_id) == 0
    )  # nothing had settled
    # started again, it bills the dead process's journal before it serves
    await tollway(cfg)
    assert (
        await pg.fetchval("SELECT count(*) FROM usage_events WHERE tenant_id = $1", tenant_id)
        == STREAMS
    )
    rows = await pg.fetch(
        "SELECT request_id, status, error_code, counted, completion_tokens, prompt_tokens,"
        " details FROM usage_events WHERE tenant_id = $1",
        tenant_id,
    )
    for row in rows:
        assert row["error_code"] == "interrupted" and row["counted"], dict(row)
        assert orjson.loads(row["details"])["interrupted"] is True
        assert 0 < row["completion_tokens"] <= trickle.sent[row["request_id"]], dict(row)
        # ~1 s of the stream (20 tokens) lost at most; 2 s of margin for a loaded machine
        delivered = len(got[ids.index(row["request_id"])])
        assert row["completion_tokens"] >= delivered - 40, (dict(row), delivered)
    counter = await pg.fetchrow(
        "SELECT requests_used, tokens_used FROM quota_counters WHERE tenant_id = $1", tenant_id
    )
    assert counter["requests_used"] == STREAMS
    assert counter["tokens_used"] == sum(r["completion_tokens"] + r["prompt_tokens"] for r in rows)
    # a journal replayed twice bills once: the rows are keyed by event id
    dead = tmp_path / "journal-dead.jsonl"
    dead.write_bytes(lines)
    await tollway(cfg)
    assert not dead.exists()
    assert (
        await pg.fetchval("SELECT count(*) FROM usage_events WHERE tenant_id = $1", tenant_id)
        == STREAMS
    )
