"""Batches survive their workers and their database: a ``tollway serve``
killed with SIGKILL mid-batch, and Postgres restarted mid-batch. Either way
the batch completes, every line once in its output file and billed once."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest
from aiohttp import web

from proxy.stores.embedded import EmbeddedPostgres
from tests.batch_helpers import chat_line, finished, lines_of, rows_per_line, upload
from tests.billing_helpers import billing_config, tenant_with_key
from tests.conftest import StartGateway
from tests.fakes import FakeOpenAI
from tests.test_supervisor import Tollway, tollway  # noqa: F401 - the fixture
from tests.waiting import until

LINES = 120
PROVIDER_LATENCY_S = 0.03  # each line takes this long at the provider: the batch lasts a while


class SlowOpenAI(FakeOpenAI):
    """The fake provider, answering each chat request after a fixed latency."""

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(
            PROVIDER_LATENCY_S
        )  # the provider's latency, not a wait for a condition
        return await super()._chat(request)


@pytest.fixture
async def slow() -> AsyncIterator[SlowOpenAI]:
    fake = await SlowOpenAI().start()
    yield fake  # type: ignore[misc]
    await fake.close()


def _config(url: str) -> dict[str, Any]:
    cfg = billing_config(url)
    cfg["batches"] = {"poll_interval_s": 0.05, "lease_s": 2, "worker_concurrency": 4}
    return cfg


async def _progress(client: openai.AsyncOpenAI, batch_id: str, at_least: int) -> None:
    async def check() -> bool:
        b = await client.batches.retrieve(batch_id)
        return b.request_counts is not None and b.request_counts.completed >= at_least

    await until(check, 30, interval=0.05, what=f"{at_least} lines done")


async def _each_line_once(
    client: openai.AsyncOpenAI, pool: asyncpg.Pool, tenant: str, batch_id: str
) -> None:
    done = await finished(client, batch_id, limit=60)
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (LINES, 0)
    output = await lines_of(client, done.output_file_id)
    assert sorted(x["custom_id"] for x in output) == sorted(f"l{i}" for i in range(LINES))

    async def billed() -> bool:
        rows = await rows_per_line(pool, tenant)
        return len(rows) == LINES

    await until(billed, 20, what="a usage row for every line")
    rows = await rows_per_line(pool, tenant)
    assert {k: len(v) for k, v in rows.items()} == {x["id"]: 1 for x in output}
    assert all(v[0]["counted"] for v in rows.values())


async def test_a_killed_worker_s_lines_run_again_and_are_billed_once(
    tollway: Any,  # noqa: F811 - the fixture
    slow: SlowOpenAI,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    cfg = _config(slow.url)
    tenant, key = await tenant_with_key(pg, tmp_path, "pro")
    t: Tollway = await tollway(cfg)
    client = openai.AsyncOpenAI(base_url=t.url + "/v1", api_key=key["api_key"], max_retries=0)
    lines = [chat_line(f"l{i}", "fake-model") for i in range(LINES)]
    batch = await client.batches.create(
        input_file_id=await upload(client, lines, tmp_path),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    await _progress(client, batch.id, 10)
    t.proc.send_signal(signal.SIGKILL)  # with lines in flight and usage not yet flushed
    await t.proc.wait()
    left = await pg.fetchval(
        "SELECT count(*) FROM batch_lines WHERE batch_id = $1 AND state = 'pending'", batch.id
    )
    assert left > 0, "the batch finished before the kill; nothing was tested"
    t = await tollway(cfg)  # same data dir: it bills the dead worker's journal, then runs on
    client = openai.AsyncOpenAI(base_url=t.url + "/v1", api_key=key["api_key"], max_retries=0)
    await _each_line_once(client, pg, tenant, batch.id)
    rerun = await pg.fetchval(
        "SELECT count(*) FROM batch_lines WHERE batch_id = $1 AND attempts > 1", batch.id
    )
    assert rerun > 0, "no line was leased when the worker died"


async def test_postgres_restarted_mid_batch(
    start_gateway: StartGateway,
    slow: SlowOpenAI,
    own_db: tuple[str, EmbeddedPostgres],
    tmp_path: Path,
) -> None:
    url, server = own_db
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    assert pool is not None
    tenant, key = await tenant_with_key(pool, tmp_path, "pro")
    await pool.close()
    gw = await start_gateway(_config(slow.url), database_url=url, data_dir=tmp_path)
    client = gw.sdk(api_key=key["api_key"])
    lines = [chat_line(f"l{i}", "fake-model") for i in range(LINES)]
    batch = await client.batches.create(
        input_file_id=await upload(client, lines, tmp_path),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    await _progress(client, batch.id, 10)
    server.stop()  # the database goes away mid-batch
    with pytest.raises(openai.InternalServerError):  # 503: the API says so while it is away
        await client.batches.retrieve(batch.id)
    server.start()
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    assert pool is not None
    try:
        await _each_line_once(client, pool, tenant, batch.id)
    finally:
        await pool.close()
