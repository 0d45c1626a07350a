"""Opening and closing the billing parts as one ``cleanup_ctx`` resource."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from aiohttp import web

from proxy.config.budgets import MICROS
from proxy.config.tiers import BillingPolicy
from proxy.stages.admit.billing import Billing, new_worker_id
from proxy.stages.auth import Authenticator, KeyCache
from proxy.stores import apikeys, migrate, pgdsn
from proxy.stores import journal as journals
from proxy.stores.budgets import BudgetBook
from proxy.stores.journal import Journal
from proxy.stores.ledger import Ledger, Spool
from proxy.stores.quota import Clock, QuotaBook, utc_now
from proxy.web.keys import BILLING, CONFIG, TASKS

POOL_SIZE = 10
STATEMENT_CACHE = 100  # asyncpg's default


@dataclass(frozen=True, slots=True)
class BillingOptions:
    database_url: str
    data_dir: Path
    clock: Clock = utc_now
    worker_id: str = ""
    pool_size: int = POOL_SIZE  # Postgres connections per worker, at most
    # asyncpg's prepared-statement cache; 0 behind PgBouncer in transaction
    # pooling mode (before 1.21), where a statement may meet another backend.
    # A ``statement_cache_size`` on the URL wins (``proxy.stores.pgdsn``).
    statement_cache_size: int = STATEMENT_CACHE

    @classmethod
    def from_env(cls, database_url: str, data_dir: Path) -> BillingOptions:
        """``TOLLWAY_PG_POOL_SIZE`` and ``TOLLWAY_PG_STATEMENT_CACHE``."""
        env = os.environ
        return cls(
            database_url,
            data_dir,
            pool_size=int(env.get("TOLLWAY_PG_POOL_SIZE") or POOL_SIZE),
            statement_cache_size=int(env.get("TOLLWAY_PG_STATEMENT_CACHE") or STATEMENT_CACHE),
        )


async def open_pool(opts: BillingOptions, connect_timeout: float = 2.0) -> asyncpg.Pool:
    """The pool: every new connection within ``connect_timeout`` (asyncpg's
    default is 60 s), every statement within 10 s (the request path bounds
    its own waits tighter, see ``pgwait``)."""
    dsn, on_url = pgdsn.split(opts.database_url)
    pool = await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=opts.pool_size,
        timeout=connect_timeout,
        command_timeout=10,
        statement_cache_size=opts.statement_cache_size if on_url is None else on_url,
        reset=_keep_session,
    )
    assert pool is not None
    return pool


async def _keep_session(conn: asyncpg.Connection) -> None:
    """No reset query when a connection goes back to the pool (asyncpg's
    default is a round trip per use: every flush, key lookup and lease).
    Nothing Tollway runs on this pool changes the session: no SET, LISTEN,
    cursor outside a transaction or session advisory lock (migrations and
    the event log use connections of their own). asyncpg still rolls back
    a transaction left open before this is called."""


def billing_ctx(opts: BillingOptions) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG].current.config
        policy = config.billing or BillingPolicy()
        pool = await open_pool(opts, policy.db_timeout_s)
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
            budgets = BudgetBook(
                pool, worker, int(policy.lease_budget_usd * MICROS), policy.db_timeout_s
            )
            ledger.on_budget_leases = budgets.keep_only
            journal = Journal(
                opts.data_dir / f"journal-{worker}.jsonl",
                batch_every=policy.flush_interval_ms / 1000,
            )
            billing = Billing(
                Authenticator(pool, hasher, KeyCache(policy.key_cache_ttl_s), policy.db_timeout_s),
                quota,
                ledger,
                config.prices,
                journal,
                budgets,
            )
            await ledger.replay_orphans(opts.data_dir)
            # After the spools: a dead worker's real rows land before its interrupted ones.
            await journals.replay_orphans(pool, opts.data_dir, journal.path, config.prices)
            app[BILLING] = billing
            flusher = app[TASKS].spawn(ledger.run(), name="ledger")
            journaler = app[TASKS].spawn(journal.run(), name="journal")
            yield
            ledger.stop()
            await flusher
            await quota.settle_top_ups()  # a block leased ahead is handed back with the rest
            await budgets.settle_top_ups()
            await ledger.close()
            journal.stop()
            await journaler
            await journal.close()
        finally:
            await pool.close()

    return ctx
