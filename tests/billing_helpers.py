"""Helpers for billing tests: tenants and keys made through the real admin code."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from proxy.config.tiers import Tier
from proxy.core.errors import QuotaExceeded
from proxy.core.principal import Principal
from proxy.pipeline.registry import parse_config
from proxy.stores import accounts, apikeys
from proxy.stores.quota import QuotaBook
from tests.conftest import gateway_config
from tests.db import unique
from tests.waiting import until

TEST_TIERS: dict[str, Any] = {
    "tiny": {
        "requests_per_hour": 1000,
        "monthly_requests": 10,
        "monthly_tokens": 1_000_000,
        "max_tokens": 100,
    },
    "tokens": {
        "requests_per_hour": 1000,
        "monthly_requests": 1000,
        "monthly_tokens": 600,
        "max_tokens": 100,
    },
    "free": {
        "requests_per_hour": 100,
        "monthly_requests": 3000,
        "monthly_tokens": 1_000_000,
        "max_tokens": 1024,
        "models": ["echo", "fake-model"],
    },
    "pro": {
        "requests_per_hour": 1000,
        "monthly_requests": 30000,
        "monthly_tokens": 20_000_000,
        "max_tokens": 4096,
    },
}


OF_TENANT = "FROM usage_events e JOIN tenants t ON t.id = e.tenant_id WHERE t.name = $1"
USAGE_COUNT = f"SELECT count(*) {OF_TENANT}"  # a tenant's usage rows
USAGE_ROWS = f"SELECT e.* {OF_TENANT}"


def billing_config(provider_url: str, **billing: Any) -> dict[str, Any]:
    return gateway_config(
        provider_url,
        auth="keys",
        tiers=TEST_TIERS,
        prices={"fake-model": {"prompt": 1.0, "completion": 2.0}},
        billing={"flush_interval_ms": 10, "key_cache_ttl_s": 0.5, **billing},
    )


def tier_names(provider_url: str) -> set[str]:
    return set(parse_config(yaml.safe_dump(billing_config(provider_url)), {}).tiers)


async def tenant_with_key(
    pool: asyncpg.Pool, data_dir: Path, tier: str, tiers: set[str] | None = None
) -> tuple[str, dict[str, Any]]:
    names = tiers or set(TEST_TIERS)
    tenant = unique("t")
    await accounts.create_tenant(pool, tenant, tier, names, "test")
    hasher = apikeys.KeyHasher(apikeys.load_secret(data_dir))
    key = await accounts.create_key(pool, hasher, tenant, "k", None, None, names, "test")
    return tenant, key


async def wait_for(
    pool: asyncpg.Pool, query: str, *args: Any, expect: Any, limit: float = 5.0
) -> Any:
    """Poll until the query returns ``expect`` (usage is written in batches)."""
    seen: list[Any] = [None]

    async def check() -> bool:
        seen[0] = await pool.fetchval(query, *args)
        return bool(seen[0] == expect)

    try:
        await until(check, limit)
    except AssertionError:
        raise AssertionError(f"{query!r} stayed {seen[0]!r}, expected {expect!r}") from None
    return seen[0]


# One client's way to admit a request as the admit stage does: the local
# leases' fast path (None: short), else the awaited refill.
Admitter = tuple[Callable[[], object | None], Callable[[], Awaitable[object]]]


async def admit_concurrently(
    book: QuotaBook, who: Principal, tier: Tier, clients: int, each: int, pause_s: float, seed: int
) -> tuple[int, int]:
    """``clients`` clients each try ``each`` quota admissions of 100 tokens
    (``admit_in_flight``); the admitted and refused counts."""
    admitter = (lambda: book.take(who, tier, 100), lambda: book.admit(who, tier, 100))
    return await admit_in_flight([admitter] * clients, each, pause_s, seed)


async def admit_in_flight(
    clients: Sequence[Admitter], each: int, pause_s: float, seed: int
) -> tuple[int, int]:
    """Each client tries ``each`` admissions the way a request does (the
    fast path, else the awaited refill; a 429 ``QuotaExceeded`` counts as
    refused), pausing ``pause_s`` to 3x that between them (requests in
    flight); the admitted and refused counts."""
    rng = random.Random(seed)
    admitted = refused = 0

    async def client(admitter: Admitter) -> None:
        nonlocal admitted, refused
        take, admit = admitter
        for _ in range(each):
            try:
                if take() is None:
                    await admit()
                admitted += 1
            except QuotaExceeded:
                refused += 1
            # The load's shape (requests in flight), not a wait for anything.
            await asyncio.sleep(pause_s + rng.random() * 2 * pause_s)

    await asyncio.gather(*(client(admitter) for admitter in clients))
    return admitted, refused
