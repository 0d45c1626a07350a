"""Stored responses of the Responses API: kept, found by their owner, expired.

Every wait is bounded (``pgwait``): a frozen Postgres fails a lookup with
``DatabaseDown`` rather than holding the request, and a write that cannot be
made is the caller's to log (an answer already given is not failed for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from proxy.stores import pgwait


@dataclass(frozen=True, slots=True)
class Stored:
    body: bytes  # the Response object, as served
    history: bytes  # its input and output, as chat messages (JSON array)


class ResponseStore:
    def __init__(self, pool: asyncpg.Pool, retention_s: float, timeout_s: float) -> None:
        self.pool = pool
        self.retention_s = retention_s
        self._budget = pgwait.Budget(timeout_s)

    async def put(self, scope: str, response_id: str, body: bytes, history: bytes) -> None:
        await pgwait.fetchrow(
            self.pool,
            self._budget,
            "store a response",
            "INSERT INTO responses (id, scope, body, history, expires_at)"
            " VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))"
            " ON CONFLICT (scope, id) DO NOTHING",
            response_id,
            scope,
            body,
            history,
            self.retention_s,
        )

    async def get(self, scope: str, response_id: str) -> Stored | None:
        row = await pgwait.fetchrow(
            self.pool,
            self._budget,
            "find a stored response",
            "SELECT body, history FROM responses"
            " WHERE id = $1 AND scope = $2 AND expires_at > now()",
            response_id,
            scope,
        )
        return None if row is None else Stored(bytes(row["body"]), bytes(row["history"]))

    async def delete(self, scope: str, response_id: str) -> bool:
        row = await pgwait.fetchrow(
            self.pool,
            self._budget,
            "delete a stored response",
            "DELETE FROM responses WHERE id = $1 AND scope = $2 RETURNING id",
            response_id,
            scope,
        )
        return row is not None

    async def sweep(self, batch: int = 10_000) -> int:
        """Delete up to ``batch`` expired rows; how many went."""
        row = await pgwait.fetchrow(
            self.pool,
            self._budget,
            "sweep stored responses",
            "WITH gone AS (DELETE FROM responses WHERE id IN"
            " (SELECT id FROM responses WHERE expires_at <= now() LIMIT $1) RETURNING 1)"
            " SELECT count(*) AS n FROM gone",
            batch,
        )
        return int(row["n"]) if row is not None else 0
