"""Ending batches: expire what outlived its window, drop the idle lines of
cancelled ones, and when a batch has no pending line left write its output
and error files and give it its terminal status."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg

from proxy.stores import files
from proxy.stores.batch_queue import drop_idle
from proxy.stores.batch_rows import SELECT_BATCH, as_openai


@dataclass(frozen=True, slots=True)
class Ended:
    """A batch ``sweep`` brought to a terminal status (for its event)."""

    tenant_id: int
    batch: dict[str, Any]


class Sweeper:
    """The sweep's side of ``BatchStore``."""

    pool: asyncpg.Pool
    retention: timedelta  # of the output and error files

    async def sweep(self) -> list[Ended]:
        """Expire what outlived its window, drop the idle lines of cancelled
        batches, and end every batch with no pending line left."""
        ended: list[Ended] = []
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                for (batch_id,) in await conn.fetch(
                    "SELECT id FROM batches WHERE status = 'in_progress' AND expires_at <= now()"
                ):
                    await drop_idle(
                        conn,
                        "expired",
                        batch_id,
                        "batch_expired",
                        "This request could not be executed before the completion window expired.",
                    )
                for (batch_id,) in await conn.fetch(
                    "SELECT id FROM batches WHERE status = 'cancelling'"
                ):
                    await drop_idle(conn, "cancelled", batch_id)
                await conn.execute(
                    "UPDATE batches b SET status = 'finalizing', finalizing_at = now()"
                    " WHERE status = 'in_progress' AND NOT EXISTS (SELECT 1 FROM batch_lines l"
                    "  WHERE l.batch_id = b.id AND l.state = 'pending')"
                )
            while (done := await self._end_one(conn)) is not None:
                ended.append(done)
        return ended

    async def _end_one(self, conn: asyncpg.Connection) -> Ended | None:
        async with conn.transaction():
            b = await conn.fetchrow(
                "SELECT b.id, b.tenant_id, b.status, b.errors FROM batches b"
                " WHERE (b.status = 'finalizing' OR (b.status = 'cancelling' AND NOT EXISTS"
                "  (SELECT 1 FROM batch_lines l WHERE l.batch_id = b.id AND l.state = 'pending')))"
                " ORDER BY b.seq LIMIT 1 FOR UPDATE SKIP LOCKED"
            )
            if b is None:
                return None
            output = await self._file(conn, b["tenant_id"], b["id"], "output", True)
            error = await self._file(conn, b["tenant_id"], b["id"], "error", False)
            if b["status"] == "cancelling":
                status = "cancelled"
            elif b["errors"]:
                status = "failed"
            elif await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM batch_lines"
                " WHERE batch_id = $1 AND state = 'expired')",
                b["id"],
            ):
                status = "expired"
            else:
                status = "completed"
            await conn.execute(
                f"UPDATE batches SET status = $2, {status}_at = now(),"
                " output_file_id = $3, error_file_id = $4 WHERE id = $1",
                b["id"],
                status,
                output,
                error,
            )
            row = await conn.fetchrow(SELECT_BATCH + " WHERE b.id = $1", b["id"])
        return Ended(b["tenant_id"], as_openai(row))

    async def _file(
        self, conn: asyncpg.Connection, tenant_id: int, batch_id: str, kind: str, ok: bool
    ) -> str | None:
        """The batch's output (``ok``) or error file, or None when it has no
        such line. Built inside Postgres: a 10,000-line batch's results are
        megabytes, and fetching them into a niced batch process on a busy
        machine to send them back took longer than the pool's command
        timeout, so the batch never ended and every sweep failed again."""
        file_id = await conn.fetchval(
            "INSERT INTO files (id, tenant_id, purpose, filename, bytes, content, expires_at)"
            " SELECT $1, $2, 'batch_output', $3, octet_length(s.c), s.c, now() + $6"
            " FROM (SELECT convert_to(string_agg(result::text || E'\\n', '' ORDER BY line),"
            "  'UTF8') AS c FROM batch_lines"
            "  WHERE batch_id = $4 AND result IS NOT NULL AND (state = 'completed') = $5) s"
            " WHERE s.c IS NOT NULL RETURNING id",
            files.new_file_id(),
            tenant_id,
            f"{batch_id}_{kind}.jsonl",
            batch_id,
            ok,
            self.retention,
        )
        return str(file_id) if file_id is not None else None

    async def expire_files(self) -> int:
        """Delete the files past their retention (``batches.file_retention_days``)."""
        return await files.FileStore(self.pool).sweep()
