"""Batches and the durable queue of their lines, in Postgres.

``BatchStore`` is one object over three jobs: the API's (create, read,
list, cancel: here), the workers' (lease, run, give back: ``batch_queue``)
and the sweep's (expire, cancel, end with output and error files:
``batch_sweep``); a batch's ids and its ``Batch`` object are in
``batch_rows``.

The status machine is OpenAI's: ``validating`` → ``in_progress`` →
``finalizing`` → ``completed``; ``failed`` (the input did not validate, or
the creator's key was revoked); ``expired`` (the completion window ran out:
the lines not run are ``batch_expired`` in the error file); ``cancelling`` →
``cancelled``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import asyncpg
import orjson

from proxy.core.batch_input import InputLine
from proxy.stores.batch_queue import LineQueue, drop_idle
from proxy.stores.batch_rows import SELECT_BATCH, as_openai, down, new_batch_id
from proxy.stores.batch_sweep import Sweeper
from proxy.stores.pgwait import UNAVAILABLE


class BatchStore(LineQueue, Sweeper):
    def __init__(self, pool: asyncpg.Pool, retention: timedelta) -> None:
        self.pool = pool
        self.retention = retention  # of the output and error files

    # --- the API ---------------------------------------------------------

    async def create(
        self,
        tenant_id: int,
        key_id: str,
        endpoint: str,
        input_file_id: str,
        window: timedelta,
        window_name: str,
        metadata: dict[str, str] | None,
        lines: list[InputLine],
        errors: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """A batch in progress with its lines queued; ``failed`` at once
        when ``errors`` (what validating the input found)."""
        batch_id = new_batch_id()
        status = "failed" if errors else "in_progress"
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO batches (id, tenant_id, key_id, endpoint, input_file_id,"
                    " completion_window, status, metadata, errors, total, expires_at,"
                    " in_progress_at, failed_at)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now() + $11,"
                    " CASE WHEN $7 = 'in_progress' THEN now() END,"
                    " CASE WHEN $7 = 'failed' THEN now() END)",
                    batch_id,
                    tenant_id,
                    key_id,
                    endpoint,
                    input_file_id,
                    window_name,
                    status,
                    orjson.dumps(metadata).decode() if metadata is not None else None,
                    orjson.dumps(errors).decode() if errors else None,
                    0 if errors else len(lines),
                    window,
                )
                if not errors:
                    await _queue(conn, batch_id, tenant_id, lines)
                row = await conn.fetchrow(SELECT_BATCH + " WHERE b.id = $1", batch_id)
        except UNAVAILABLE as exc:
            raise down(exc) from exc
        return as_openai(row)

    async def get(self, tenant_id: int, batch_id: str) -> dict[str, Any] | None:
        try:
            row = await self.pool.fetchrow(
                SELECT_BATCH + " WHERE b.id = $1 AND b.tenant_id = $2", batch_id, tenant_id
            )
        except UNAVAILABLE as exc:
            raise down(exc) from exc
        return as_openai(row) if row is not None else None

    async def page(
        self, tenant_id: int | None, after: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        """Newest first (``tenant_id`` None: every tenant's, for the CLI)."""
        try:
            rows = await self.pool.fetch(
                SELECT_BATCH + " WHERE ($1::bigint IS NULL OR b.tenant_id = $1)"
                " AND ($2::text IS NULL OR b.seq < (SELECT seq FROM batches WHERE id = $2))"
                " ORDER BY b.seq DESC LIMIT $3",
                tenant_id,
                after,
                limit + 1,
            )
        except UNAVAILABLE as exc:
            raise down(exc) from exc
        return [as_openai(r) for r in rows[:limit]], len(rows) > limit

    async def owner(self, batch_id: str) -> int | None:
        """The batch's tenant (the CLI acts for any tenant)."""
        try:
            value = await self.pool.fetchval(
                "SELECT tenant_id FROM batches WHERE id = $1", batch_id
            )
        except UNAVAILABLE as exc:
            raise down(exc) from exc
        return int(value) if value is not None else None

    async def cancel(self, tenant_id: int, batch_id: str) -> dict[str, Any] | None:
        """``cancelling`` now; the lines not leased are dropped at once, the
        ones running finish, then ``sweep`` ends it as ``cancelled``."""
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                moved = await conn.fetchval(
                    "UPDATE batches SET status = 'cancelling', cancelling_at = now()"
                    " WHERE id = $1 AND tenant_id = $2 AND status IN ('validating', 'in_progress')"
                    " RETURNING id",
                    batch_id,
                    tenant_id,
                )
                if moved is not None:
                    await drop_idle(conn, "cancelled", batch_id)
                row = await conn.fetchrow(
                    SELECT_BATCH + " WHERE b.id = $1 AND b.tenant_id = $2", batch_id, tenant_id
                )
        except UNAVAILABLE as exc:
            raise down(exc) from exc
        return as_openai(row) if row is not None else None


async def _queue(
    conn: asyncpg.Connection, batch_id: str, tenant_id: int, lines: list[InputLine]
) -> None:
    """The batch's lines, pending, in one COPY."""
    await conn.copy_records_to_table(
        "batch_lines",
        columns=("batch_id", "line", "tenant_id", "custom_id", "body"),
        records=[
            (batch_id, x.line, tenant_id, x.custom_id, orjson.dumps(x.body).decode()) for x in lines
        ],
    )
