"""Graceful shutdown in process: drain, grace period, aborted streams still billed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from proxy.web.keys import LIFECYCLE
from proxy.web.lifecycle import shutdown
from tests.billing_helpers import billing_config, tenant_with_key
from tests.conftest import StartGateway
from tests.fakes import FakeOpenAI
from tests.waiting import until

MSG = [{"role": "user", "content": "tell me"}]
GRACE = 2.0
ROWS = """
SELECT e.status, e.prompt_tokens, e.completion_tokens, e.usage_source, e.counted
FROM usage_events e JOIN tenants t ON t.id = e.tenant_id WHERE t.name = $1
ORDER BY e.status, e.completion_tokens DESC
"""


@pytest.fixture
async def stuck_openai() -> AsyncIterator[FakeOpenAI]:
    """A second fake whose held streams are never released."""
    fake = await FakeOpenAI().start()
    yield fake
    fake.release.set()
    await fake.close()


def drain_config(fake: FakeOpenAI, stuck: FakeOpenAI) -> dict[str, Any]:
    cfg = billing_config(fake.url)
    cfg["providers"]["stuck"] = {
        "kind": "openai",
        "base_url": stuck.url,
        "api_key": "sk-provider-secret",
        "timeouts": {"connect": 2, "first_byte": 5, "idle": 5, "total": 30},
    }
    cfg["providers"]["fake"]["timeouts"] = {"connect": 2, "first_byte": 5, "idle": 5, "total": 30}
    cfg["models"] += [
        {"name": "slow", "targets": [{"provider": "stuck", "model": "held"}]},
        {"name": "silent", "targets": [{"provider": "stuck", "model": "hang"}]},
    ]
    return cfg


async def test_shutdown_drains_then_aborts_and_bills_everything(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    stuck_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    gw = await start_gateway(
        drain_config(fake_openai, stuck_openai), database_url=pg_url, data_dir=tmp_path
    )
    tenant, key = await tenant_with_key(pg, tmp_path, "pro")
    auth = {"Authorization": f"Bearer {key['api_key']}"}
    url = gw.base_url + "/chat/completions"
    async with aiohttp.ClientSession() as s, aiohttp.ClientSession() as idle:
        async with idle.get(gw.url + "/readyz") as r:  # a keep-alive connection, idle now
            assert r.status == 200
        finishing = await s.post(
            url, json={"model": "fake-held", "messages": MSG, "stream": True}, headers=auth
        )
        stuck = await s.post(
            url, json={"model": "slow", "messages": MSG, "stream": True}, headers=auth
        )
        assert (await finishing.content.readline()).startswith(b"data: ")
        assert (await stuck.content.readline()).startswith(b"data: ")
        waiting = asyncio.ensure_future(  # noqa: TID251 - awaited below
            s.post(url, json={"model": "silent", "messages": MSG}, headers=auth)
        )
        lifecycle = gw.app[LIFECYCLE]
        # in flight: all three in the gateway, the waiting one at its provider
        await until(lambda: lifecycle.requests == 3 and len(stuck_openai.seen) == 2)
        assert lifecycle.streams == 2

        # the grace is long enough for the steps below on a loaded machine
        stopping = asyncio.ensure_future(shutdown(gw.runner, grace=GRACE))  # noqa: TID251
        await until(lambda: lifecycle.draining and not gw.runner.sites)
        async with idle.get(gw.url + "/readyz") as r:  # draining: not ready, and goodbye
            assert r.status == 503 and (await r.json())["status"] == "draining"
            assert r.headers.get("Connection", "").lower() == "close"
        with pytest.raises(aiohttp.ClientConnectionError):  # no longer accepting
            async with aiohttp.ClientSession() as fresh, fresh.get(gw.url + "/healthz"):
                pass
        fake_openai.release.set()  # this stream ends within the grace period
        finished = await finishing.read()
        assert not lifecycle.aborting, "the finishing stream needed more than the grace"
        cut = await stuck.read()  # ended by the gateway after the grace period, cleanly
        refused = await waiting
        await stopping

    assert finished.rstrip().endswith(b"data: [DONE]")
    events = [e for e in cut.decode().split("\n\n") if e.startswith("data: ")]
    error = orjson.loads(events[-1][6:])["error"]
    assert error["code"] == "server_shutting_down" and error["type"] == "server_error"
    assert refused.status == 503
    assert (await refused.json())["error"]["code"] == "server_shutting_down"
    # every request was settled and written before the app closed (final flush)
    assert len(await pg.fetch(ROWS, tenant)) == 3  # no waiting: the final flush wrote them
    ok, cut_row, refused_row = await pg.fetch(ROWS, tenant)
    assert ok["status"] == 200 and ok["counted"]
    assert cut_row["status"] == 503 and cut_row["counted"] and cut_row["completion_tokens"] > 0
    assert cut_row["usage_source"] == "estimated"  # what was delivered, counted locally
    assert refused_row["status"] == 503 and not refused_row["counted"]
