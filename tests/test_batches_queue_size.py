"""The batch queue at bench size: with 50,000 lines in ``batch_lines`` (a
finished 25,000-line batch waiting to be ended and a running one, with
lines done, leased and deferred) the claim, the batch read and the sweep
each answer far inside the pool's 10 s command timeout, against the real
embedded Postgres. They once stopped a batch process's lines at about this
size (``batch queue unreachable (TimeoutError)``, bench/RESULTS.md)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import orjson
import pytest

from proxy.stores.batch_rows import new_batch_id
from proxy.stores.batches import BatchStore
from tests.db import unique

LINES = 25_000  # per batch; two batches
BOUND_S = 2.0  # each call; the pool's command timeout is 10 s


@pytest.fixture
async def pool(pg_url: str) -> AsyncIterator[asyncpg.Pool]:
    made = await asyncpg.create_pool(pg_url, min_size=1, max_size=2, command_timeout=10)
    assert made is not None
    yield made
    await made.close()


async def _batch(pool: asyncpg.Pool, tenant_id: int) -> str:
    batch_id = new_batch_id()
    await pool.execute(
        "INSERT INTO batches (id, tenant_id, key_id, endpoint, input_file_id,"
        " completion_window, status, total, expires_at, in_progress_at)"
        " VALUES ($1, $2, 'key_x', '/v1/chat/completions', 'file-x', '24h', 'in_progress',"
        " $3, now() + interval '24 hours', now())",
        batch_id,
        tenant_id,
        LINES,
    )
    # The rows as ``create`` copies them; every line done is completed but each 10th, failed.
    await pool.execute(
        "INSERT INTO batch_lines (batch_id, line, tenant_id, custom_id, body)"
        " SELECT $1, n, $2, 'c' || n, jsonb_build_object('model', 'm', 'messages',"
        "  jsonb_build_array(jsonb_build_object('role', 'user', 'content', 'hello ' || n)))"
        " FROM generate_series(1, $3) n",
        batch_id,
        tenant_id,
        LINES,
    )
    return batch_id


async def _done(pool: asyncpg.Pool, batch_id: str, upto: int) -> None:
    await pool.execute(
        "UPDATE batch_lines SET state = CASE WHEN line % 10 = 0 THEN 'failed' ELSE 'completed' END,"
        " done_at = now(), result = jsonb_build_object('id', 'batch_req_' || line,"
        "  'custom_id', custom_id, 'response', jsonb_build_object('status_code', 200,"
        "  'body', jsonb_build_object('content', repeat('Hello there! ', 20))), 'error', NULL)"
        " WHERE batch_id = $1 AND line <= $2",
        batch_id,
        upto,
    )


async def _timed(what: str, call: object) -> object:
    start = time.monotonic()
    result = await call  # type: ignore[misc]
    took = time.monotonic() - start
    assert took < BOUND_S, f"{what} took {took:.2f}s with {2 * LINES} lines queued"
    return result


async def test_claim_read_and_sweep_stay_fast_with_50k_lines(pool: asyncpg.Pool) -> None:
    tenant_id = await pool.fetchval(
        "INSERT INTO tenants (name, tier) VALUES ($1, 'free') RETURNING id", unique("bq")
    )
    finished = await _batch(pool, tenant_id)
    running = await _batch(pool, tenant_id)
    await _done(pool, finished, LINES)
    await _done(pool, running, 5_000)
    await pool.execute(  # 8 lines running elsewhere, 500 held back by a quota
        "UPDATE batch_lines SET leased_until = now() + interval '60 seconds'"
        " WHERE batch_id = $1 AND line BETWEEN 5001 AND 5008",
        running,
    )
    await pool.execute(
        "UPDATE batch_lines SET not_before = now() + interval '1 hour'"
        " WHERE batch_id = $1 AND line BETWEEN 5009 AND 5508",
        running,
    )
    store = BatchStore(pool, timedelta(days=1))

    read = await _timed("the batch read", store.get(tenant_id, running))
    assert isinstance(read, dict)
    assert read["request_counts"] == {"total": LINES, "completed": 4_500, "failed": 500}

    leased = await _timed("the claim", store.claim(64, 100, 100, 60.0))
    assert isinstance(leased, list)
    # Past the lines done, leased elsewhere and held back: the first free ones, in order.
    ours = [x.line for x in leased if x.batch_id == running]
    assert ours and ours == list(range(5509, 5509 + len(ours)))

    ended = await _timed("the sweep", store.sweep())
    assert isinstance(ended, list)
    [one] = [x.batch for x in ended if x.batch["id"] == finished]
    assert one["status"] == "completed"
    assert one["request_counts"] == {"total": LINES, "completed": 22_500, "failed": 2_500}
    # The output file holds the completed lines' results, one JSON line each, in order.
    content = await pool.fetchval("SELECT content FROM files WHERE id = $1", one["output_file_id"])
    out = [orjson.loads(x) for x in bytes(content).splitlines()]
    assert len(out) == 22_500 and out[0]["custom_id"] == "c1" and out[-1]["custom_id"] == "c24999"
    still = await store.get(tenant_id, running)
    assert still is not None and still["status"] == "in_progress"
