"""A busy lease's quota top-ups grow (``quota._scaled``, ``quota._far_block``):
fewer lease calls under load, the same exact limit, and nothing scaled near it."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from proxy.config.tiers import BillingPolicy, Tier
from proxy.core.principal import Principal
from proxy.stores import quota
from proxy.stores.quota import BUSY_S, FAR_BLOCKS, MAX_SCALE, QuotaBook, _far_block, _Lease, _scaled
from tests.billing_helpers import admit_concurrently, tenant_with_key


def test_the_scale_doubles_once_a_busy_second_and_halves_after_a_pause() -> None:
    lease = _Lease(refilled_at=100.0)
    _scaled(lease, 100.1)  # close to the last call: busy from now on
    assert lease.scale == 1
    _scaled(lease, 100.1 + BUSY_S / 2)
    assert lease.scale == 1  # not busy for BUSY_S yet
    lease.refilled_at = 100.0 + BUSY_S
    _scaled(lease, 100.1 + BUSY_S)
    assert lease.scale == 2
    _scaled(lease, 100.2 + BUSY_S)
    assert lease.scale == 2  # at most one doubling a BUSY_S
    for i in range(2, 10):
        lease.refilled_at = 100.0 + i * BUSY_S
        _scaled(lease, 100.1 + i * BUSY_S)
    assert lease.scale == MAX_SCALE
    _scaled(lease, lease.refilled_at + BUSY_S)  # a pause: half again
    assert lease.scale == MAX_SCALE // 2


def test_a_scaled_block_only_while_postgres_has_far_blocks_of_it() -> None:
    assert _far_block(64, 16, FAR_BLOCKS * 64 * 16) == 64 * 16
    assert _far_block(64, 16, FAR_BLOCKS * 64 * 4) == 64 * 4  # nearer: smaller
    assert _far_block(64, 16, FAR_BLOCKS * 64) == 64
    assert _far_block(64, 16, FAR_BLOCKS * 64 - 1) == 0  # near: nothing ahead, as before
    assert _far_block(64, 1, None) == 0  # nothing leased yet


async def test_the_limit_is_exact_while_top_ups_scale(
    pg: asyncpg.Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 clients, 24,000 attempts, a limit of 20,000, blocks of 32 scaled
    up to 16x (busy after 0.1 s here): fewer lease calls than blocks of 32
    would need, exactly 20,000 admitted."""
    monkeypatch.setattr(quota, "BUSY_S", 0.1)
    tenant, _ = await tenant_with_key(pg, tmp_path, "pro")
    tenant_id = await pg.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    who = Principal("key_s", "tw-s", tenant_id, tenant, "scaled", None)
    tier = Tier("twenty-thousand", None, None, 20_000, 1_000_000_000_000, 4096)
    book = QuotaBook(pg, "w-scaled", BillingPolicy(lease_requests=32, lease_tokens=1_000_000))
    admitted, refused = await admit_concurrently(book, who, tier, 16, 1500, 0.0002, seed=5)
    await book.settle_top_ups()
    assert admitted == 20_000 and refused == 4_000
    assert book.top_ups > 0
    assert book.lease_calls < 20_000 // 32 // 2  # the blocks grew
    used, held = await pg.fetchrow(
        "SELECT (SELECT requests_used FROM quota_counters WHERE tenant_id = $1),"
        " (SELECT sum(requests) FROM quota_leases WHERE tenant_id = $1)",
        tenant_id,
    )
    assert (used or 0) + held == 20_000  # Postgres leased exactly the limit, no more
