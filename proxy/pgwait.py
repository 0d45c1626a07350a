"""Bounded Postgres waits on the request path.

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

# One log line per this many seconds while Postgres stays frozen, not one per request.
_LOG_EVERY_S = 5.0


class SlowLog:
    """Logs a timed-out wait at most once per ``_LOG_EVERY_S`` per process."""

    last = 0.0

    @classmethod
    def timed_out(cls, what: str, budget: float) -> None:
        now = time.monotonic()
        if now - cls.last >= _LOG_EVERY_S:
            cls.last = now
            log.error("billing database did not answer within %gs (%s)", budget, what)


async def fetchrow(
    pool: asyncpg.Pool, budget: float, what: str, query: str, *args: object
) -> asyncpg.Record | None:
    """``pool.fetchrow`` within ``budget`` seconds in all; TimeoutError when
    it runs out (logged: ``what`` names the wait)."""
    try:
        async with asyncio.timeout(budget), pool.acquire() as conn:
            try:
                return await conn.fetchrow(query, *args)
            except asyncio.CancelledError:
                conn.terminate()
                raise
    except TimeoutError:
        SlowLog.timed_out(what, budget)
        raise
