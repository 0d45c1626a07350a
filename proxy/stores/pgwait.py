"""Bounded Postgres waits on the request path, and the one place where
asyncpg's and the socket's exceptions become the stores' own.

Callers above the stores layer never see asyncpg: a query that cannot be
answered raises ``DatabaseDown``; a row Postgres refuses for its content is
the ledger's business (``proxy.stores.dead_letter.is_refusal``).

A frozen Postgres (a paused VM, a stopped postmaster, a full disk) answers
nothing and refuses nothing: without a bound a request would wait on
asyncpg's connect default (60 s), or for as long as the freeze lasts. Every
query a request makes goes through ``fetchrow`` here, whose whole wait (a
pooled connection, connecting one if needed, then the statement) is bounded
by ``billing.db_timeout_s``. A connection that timed out mid-statement is in
an unknown state and the server may never answer its cancel request, so it
is terminated rather than reset; the pool opens a fresh one later.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

log = logging.getLogger("tollway.billing")

# What "Postgres cannot answer now" looks like from asyncpg and the socket.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # A pooled connection left mid-operation by a restart ("another operation
    # is in progress"): that query cannot be answered now either.
    asyncpg.InternalClientError,
)


class DatabaseDown(Exception):
    """Postgres is unreachable, frozen past its budget, or failed the query."""


# One log line per this many seconds while Postgres stays frozen, not one per request.
_LOG_EVERY_S = 5.0


class Budget:
    """How long one kind of wait may take, and when it last ran out (its log line)."""

    __slots__ = ("_logged_at", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._logged_at = -_LOG_EVERY_S

    def ran_out(self, what: str) -> None:
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            log.error("billing database did not answer within %gs (%s)", self.seconds, what)


async def fetchrow(
    pool: asyncpg.Pool, budget: Budget, what: str, query: str, *args: object
) -> asyncpg.Record | None:
    """``pool.fetchrow`` within ``budget`` in all; ``DatabaseDown`` when it
    runs out (logged: ``what`` names the wait) or Postgres fails it."""
    try:
        async with asyncio.timeout(budget.seconds), pool.acquire() as conn:
            try:
                return await conn.fetchrow(query, *args)
            except asyncio.CancelledError:
                conn.terminate()
                raise
    except TimeoutError:
        budget.ran_out(what)
        raise DatabaseDown(f"no answer within {budget.seconds:g}s ({what})") from None
    except UNAVAILABLE as exc:
        raise DatabaseDown(f"{what}: {type(exc).__name__}") from None
