"""The quota book under concurrency, against a real Postgres."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import asyncpg

from proxy.config.tiers import BillingPolicy, Tier
from proxy.core.principal import Principal
from proxy.stores.quota import QuotaBook
from tests.billing_helpers import tenant_with_key

ROOMY = Tier("roomy", None, None, 1_000_000_000, 1_000_000_000_000, 4096)


async def test_plenty_left_is_never_refused_while_leases_churn(
    pg: asyncpg.Pool, tmp_path: Path
) -> None:
    """Requests admitted while a refill waits on Postgres may use up the
    lease; the refill must then ask again, not call the quota exhausted."""
    tenant, _ = await tenant_with_key(pg, tmp_path, "pro")
    tenant_id = await pg.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    who = Principal("key_q", "tw-q", tenant_id, tenant, "roomy", None)
    # Small blocks: a refill every few requests, so refills and admissions interleave.
    book = QuotaBook(pg, "w-churn", BillingPolicy(lease_requests=3, lease_tokens=9_000))
    rng = random.Random(7)
    refused: list[str] = []

    async def client() -> None:
        for _ in range(150):
            try:
                r = await book.admit(who, ROOMY, 4_000)
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                refused.append(str(exc))
                continue
            await asyncio.sleep(rng.random() / 1000)
            book.release(r, counted=True, tokens_used=20)

    await asyncio.gather(*(client() for _ in range(16)))
    assert refused == []
    assert book.lease_calls > 100  # the blocks really did churn
