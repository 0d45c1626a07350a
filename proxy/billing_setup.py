"""Opening and closing the billing parts as one ``cleanup_ctx`` resource."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from aiohttp import web

from proxy import apikeys, migrate
from proxy.auth import Authenticator, KeyCache
from proxy.billing import Billing, new_worker_id
from proxy.ledger import Ledger, Spool
from proxy.quota import Clock, QuotaBook, utc_now
from proxy.state import BILLING, CONFIG, SETTLER, TASKS
from proxy.tiers import BillingPolicy


@dataclass(frozen=True, slots=True)
class BillingOptions:
    database_url: str
    data_dir: Path
    clock: Clock = utc_now
    worker_id: str = ""


async def open_pool(dsn: str, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=max_size, command_timeout=10)
    assert pool is not None
    return pool


def billing_ctx(opts: BillingOptions) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG].current.config
        policy = config.billing or BillingPolicy()
        pool = await open_pool(opts.database_url)
        try:
            await migrate.check(pool)
            worker = opts.worker_id or new_worker_id()
            hasher = apikeys.KeyHasher(apikeys.load_secret(opts.data_dir))
            quota = QuotaBook(pool, worker, policy, opts.clock)
            ledger = Ledger(
                pool,
                Spool(opts.data_dir / f"spool-{worker}.jsonl"),
                worker,
                policy.flush_interval_ms / 1000,
                policy.lease_ttl_s,
                on_leases=quota.keep_only,
            )
            billing = Billing(
                Authenticator(pool, hasher, KeyCache(policy.key_cache_ttl_s)),
                quota,
                ledger,
                config.prices,
            )
            await ledger.replay_orphans(opts.data_dir)
            app[BILLING] = billing
            app[SETTLER] = billing
            flusher = app[TASKS].spawn(ledger.run(), name="ledger")
            yield
            ledger.stop()
            await flusher
            await ledger.close()
        finally:
            await pool.close()

    return ctx
