"""A busy lease's quota top-ups grow (``lease_pace.scaled``, ``lease_pace.far_block``):
fewer lease calls under load, the same exact limit, and nothing scaled near it."""

from __future__ import annotations

import time
from pathlib import Path

import asyncpg
import pytest

from proxy.config.tiers import BillingPolicy, Tier
from proxy.core.principal import Principal
from proxy.stores import lease_pace
from proxy.stores.lease_pace import BUSY_S, FAR_BLOCKS, MAX_SCALE, far_block, low_water, scaled
from proxy.stores.quota import QuotaBook, _Lease
from tests.billing_helpers import admit_concurrently, tenant_with_key


def test_the_scale_doubles_once_a_busy_second_and_halves_after_a_pause() -> None:
    lease = _Lease(refilled_at=100.0)
    scaled(lease, 100.1)  # close to the last call: busy from now on
    assert lease.scale == 1
    scaled(lease, 100.1 + BUSY_S / 2)
    assert lease.scale == 1  # not busy for BUSY_S yet
    lease.refilled_at = 100.0 + BUSY_S
    scaled(lease, 100.1 + BUSY_S)
    assert lease.scale == 2
    scaled(lease, 100.2 + BUSY_S)
    assert lease.scale == 2  # at most one doubling a BUSY_S
    for i in range(2, 10):
        lease.refilled_at = 100.0 + i * BUSY_S
        scaled(lease, 100.1 + i * BUSY_S)
    assert lease.scale == MAX_SCALE
    scaled(lease, lease.refilled_at + BUSY_S)  # a pause: half again
    assert lease.scale == MAX_SCALE // 2


def test_a_scaled_block_only_while_postgres_has_far_blocks_of_it() -> None:
    assert far_block(64, 16, FAR_BLOCKS * 64 * 16) == 64 * 16
    assert far_block(64, 16, FAR_BLOCKS * 64 * 4) == 64 * 4  # nearer: smaller
    assert far_block(64, 16, FAR_BLOCKS * 64) == 64
    assert far_block(64, 16, FAR_BLOCKS * 64 - 1) == 0  # near: nothing ahead, as before
    assert far_block(64, 1, None) == 0  # nothing leased yet


async def test_the_limit_is_exact_while_top_ups_scale(
    pg: asyncpg.Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 clients, 24,000 attempts, a limit of 20,000, blocks of 32 scaled
    up to 16x (busy after 0.1 s here): fewer lease calls than blocks of 32
    would need, exactly 20,000 admitted."""
    monkeypatch.setattr(lease_pace, "BUSY_S", 0.1)
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


def test_the_low_water_mark_is_half_of_what_the_top_up_asks_for() -> None:
    assert low_water(64, 64 * 16) == 64 * 8
    assert low_water(64, 64) == 32
    assert low_water(64, 0) == 32  # nothing ahead: half a block, as before scaling


async def test_a_scaled_lease_is_topped_up_while_the_requests_in_flight_fit(
    pg: asyncpg.Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests of 20k tokens against blocks of 80k: 30 admitted back to back
    (600k, more than any one block) before a top-up can land. A lease scaled
    to 16 blocks asks for its next top-up while half of them (640k) is left,
    so every burst fits; with a low-water mark of half a block (40k) the
    second burst would find the lease empty and wait for Postgres."""
    monkeypatch.setattr(lease_pace, "BUSY_S", 3600.0)  # the scale holds still
    tenant, _ = await tenant_with_key(pg, tmp_path, "pro")
    tenant_id = await pg.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    who = Principal("key_b", "tw-b", tenant_id, tenant, "burst", None)
    tier = Tier("roomy", None, None, 1_000_000_000, 1_000_000_000_000, 4096)
    book = QuotaBook(pg, "w-burst", BillingPolicy(lease_requests=1000, lease_tokens=80_000))
    await book.admit(who, tier, 20_000)  # the first block, on the request path
    held = book.current(tenant_id, time.time())
    assert held is not None
    held.lease.scale = MAX_SCALE  # as after a few busy seconds
    while not held.lease.topping:  # below the first block's mark: a top-up of 16
        assert book.take(who, tier, 20_000) is not None
    await book.settle_top_ups()
    for _ in range(5):
        for _ in range(30):
            assert book.take(who, tier, 20_000) is not None
        await book.settle_top_ups()  # one round trip after each burst
    assert book.top_ups >= 3  # the first, then after every other burst
