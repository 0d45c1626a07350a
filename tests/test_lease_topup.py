"""Quota leases topped up in the background, against a real Postgres: a
request under load does not find its worker's lease empty and wait for
Postgres, nothing is leased ahead near the limit, and the limit stays exact."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from proxy.config.tiers import BillingPolicy, Tier
from proxy.core.principal import Principal
from proxy.stores.quota import QuotaBook
from tests.billing_helpers import admit_concurrently, tenant_with_key

ROOMY = Tier("roomy", None, None, 1_000_000_000, 1_000_000_000_000, 4096)


async def _who(pg: asyncpg.Pool, tmp_path: Path) -> Principal:
    tenant, _ = await tenant_with_key(pg, tmp_path, "pro")
    tenant_id = await pg.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    return Principal("key_t", "tw-t", tenant_id, tenant, "roomy", None)


async def test_a_lease_far_from_the_limit_is_topped_up_before_a_request_finds_it_empty(
    pg: asyncpg.Pool, tmp_path: Path
) -> None:
    who = await _who(pg, tmp_path)
    book = QuotaBook(pg, "w-top", BillingPolicy(lease_requests=8, lease_tokens=80_000))
    await book.admit(who, ROOMY, 4_000)  # the first block, on the request path
    for _ in range(200):  # 25 blocks' worth
        # The fast path (no await) admits every one: the next block was
        # leased while half of this one was left.
        assert book.take(who, ROOMY, 4_000) is not None
        await book.settle_top_ups()  # the top-up's round trip, between two requests
    assert book.top_ups >= 24
    held = await pg.fetchval(
        "SELECT requests FROM quota_leases WHERE worker_id = 'w-top' AND tenant_id = $1",
        who.tenant_id,
    )
    assert held >= 201  # every admitted request came from a block Postgres leased


async def test_near_the_limit_nothing_is_leased_ahead(pg: asyncpg.Pool, tmp_path: Path) -> None:
    who = await _who(pg, tmp_path)
    near = Tier("near", None, None, 40, 1_000_000_000, 4096)  # under 8 blocks of 8 in all
    book = QuotaBook(pg, "w-near", BillingPolicy(lease_requests=8, lease_tokens=80_000))
    await book.admit(who, near, 100)  # leases min(8, 40 / 8) = 5
    taken = 1
    while book.take(who, near, 100) is not None:
        taken += 1
        await book.settle_top_ups()
    assert taken == 5  # the block ran out: the next request refills on the request path
    assert book.top_ups == 0


async def test_the_limit_is_exact_with_top_ups_under_concurrency(
    pg: asyncpg.Pool, tmp_path: Path
) -> None:
    """16 clients, 4,000 attempts, a limit of 3,000: top-ups run while far
    from it, refills on the request path near it; exactly 3,000 are admitted."""
    who = await _who(pg, tmp_path)
    tier = Tier("three-thousand", None, None, 3000, 1_000_000_000, 4096)
    book = QuotaBook(pg, "w-exact", BillingPolicy(lease_requests=64, lease_tokens=640_000))
    admitted, refused = await admit_concurrently(book, who, tier, 16, 250, 0.0005, seed=12)
    await book.settle_top_ups()
    assert admitted == 3000 and refused == 1000
    assert book.top_ups > 0  # the top-ups did run, far from the limit
