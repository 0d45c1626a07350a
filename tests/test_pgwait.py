"""A frozen Postgres (every process SIGSTOPped) costs a request a bounded wait, then a 503."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from proxy.stores.embedded import EmbeddedPostgres
from proxy.stores.migrate import migrate
from tests.billing_helpers import billing_config, tenant_with_key
from tests.conftest import Gateway, StartGateway
from tests.db import server_pids
from tests.fakes import FakeOpenAI
from tests.waiting import until

BUDGET = 1.0  # billing.db_timeout_s in this test
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def own_db(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """A Postgres of this test's own, so the test may freeze it."""
    server = EmbeddedPostgres(tmp_path / "own-pg", cleanup="delete")
    url = server.start()
    await migrate(url)
    yield url, tmp_path / "own-pg"


@contextlib.contextmanager
def frozen(pgdata: Path) -> Iterator[None]:
    """Every process of the server stopped, as in a VM pause; always resumed."""
    pids = server_pids(pgdata)
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def _chat(gw: Gateway, key: str) -> tuple[int, dict[str, object], float]:
    started = time.monotonic()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=BUDGET * 2 + 5)) as s,
        s.post(
            gw.base_url + "/chat/completions",
            json={"model": "fake-model", "messages": MSG},
            headers={"Authorization": f"Bearer {key}"},
        ) as r,
    ):
        body = await r.json()
        return r.status, body, time.monotonic() - started


async def test_a_frozen_postgres_gets_a_503_within_the_budget_and_service_recovers(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    own_db: tuple[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, pgdata = own_db
    cfg = billing_config(fake_openai.url, lease_requests=2, key_cache_ttl_s=60, db_timeout_s=BUDGET)
    gw = await start_gateway(cfg, database_url=url, data_dir=tmp_path)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
    assert pool is not None
    # "tiny" (10 requests a month): near its limit, so no block is leased ahead
    # in the background (quota.py's top-ups) and the lease of 2 is really used up.
    _, known = await tenant_with_key(pool, tmp_path, "tiny")
    _, unseen = await tenant_with_key(pool, tmp_path, "tiny")
    await pool.close()
    for _ in range(2):  # the key cached, its lease of 2 requests used up
        assert (await _chat(gw, known["api_key"]))[0] == 200
    with frozen(pgdata):
        for key in (unseen, known):  # a key lookup; a new lease
            status, body, took = await _chat(gw, key["api_key"])
            assert status == 503 and body["error"]["code"] == "billing_unavailable", body
            assert took < BUDGET + 1.5, took
    assert any("did not answer within" in r.getMessage() for r in caplog.records)

    async def served(key: dict[str, Any]) -> bool:
        return (await _chat(gw, key["api_key"]))[0] == 200

    for key in (unseen, known):  # thawed: both keys are served again
        await until(functools.partial(served, key), 15, interval=0.1, what="served after the thaw")
