"""Batches and the durable queue of their lines, in Postgres.

Any worker of any instance leases pending lines with ``FOR UPDATE SKIP
LOCKED`` (``claim``): the lease (``leased_until``) is the only claim, so a
killed worker's lines are leased again once it runs out. A line's result is
written once (``finish`` only moves a pending line), and when a batch has no
pending line left ``sweep`` writes its output and error files and ends it.
How many lines are leased at once per batch and per tenant is counted here,
across the fleet, from the unexpired leases.

The status machine is OpenAI's: ``validating`` → ``in_progress`` →
``finalizing`` → ``completed``; ``failed`` (the input did not validate, or
the creator's key was revoked); ``expired`` (the completion window ran out:
the lines not run are ``batch_expired`` in the error file); ``cancelling`` →
``cancelled``.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from proxy.core.batch_input import InputLine
from proxy.stores import files
from proxy.stores.pgwait import UNAVAILABLE, DatabaseDown

OPEN = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "failed", "expired", "cancelled")


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


def line_request_id(batch_id: str, line: int) -> str:
    """The line's ``id`` and request id: the same however often it runs."""
    return "batch_req_" + hashlib.sha256(f"{batch_id}:{line}".encode()).hexdigest()[:24]


def line_event_id(batch_id: str, custom_id: str) -> str:
    """The line's usage row key: one row per batch and ``custom_id``, ever."""
    return "b" + hashlib.sha256(f"{batch_id}\0{custom_id}".encode()).hexdigest()[:23]


@dataclass(frozen=True, slots=True)
class Leased:
    """One line leased to this worker, with what running it needs."""

    batch_id: str
    line: int
    custom_id: str
    body: dict[str, Any]
    tenant_id: int
    key_id: str
    endpoint: str
    attempts: int


@dataclass(frozen=True, slots=True)
class Ended:
    """A batch ``sweep`` brought to a terminal status (for its event)."""

    tenant_id: int
    batch: dict[str, Any]


_TIMES = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)

_SELECT = """
SELECT b.*,
  (SELECT count(*) FROM batch_lines l WHERE l.batch_id = b.id AND l.state = 'completed') AS done,
  (SELECT count(*) FROM batch_lines l WHERE l.batch_id = b.id
     AND l.state IN ('failed', 'expired')) AS failed
FROM batches b
"""


def as_openai(row: asyncpg.Record) -> dict[str, Any]:
    """OpenAI's ``Batch`` object."""
    out: dict[str, Any] = {
        "id": row["id"],
        "object": "batch",
        "endpoint": row["endpoint"],
        "errors": None,
        "input_file_id": row["input_file_id"],
        "completion_window": row["completion_window"],
        "status": row["status"],
        "output_file_id": row["output_file_id"],
        "error_file_id": row["error_file_id"],
        "request_counts": {
            "total": row["total"],
            "completed": row["done"],
            "failed": row["failed"],
        },
        "metadata": orjson.loads(row["metadata"]) if row["metadata"] else None,
    }
    if row["errors"]:
        out["errors"] = {"object": "list", "data": orjson.loads(row["errors"])}
    for name in _TIMES:
        at: datetime | None = row[name]
        out[name] = int(at.timestamp()) if at is not None else None
    # OpenAI's schema has no nulls for these: a field not reached yet is left out.
    return {k: v for k, v in out.items() if v is not None}


def _down(exc: BaseException) -> DatabaseDown:
    return DatabaseDown(f"{type(exc).__name__}: {exc}")


class BatchStore:
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
                    await conn.copy_records_to_table(
                        "batch_lines",
                        columns=("batch_id", "line", "tenant_id", "custom_id", "body"),
                        records=[
                            (
                                batch_id,
                                x.line,
                                tenant_id,
                                x.custom_id,
                                orjson.dumps(x.body).decode(),
                            )
                            for x in lines
                        ],
                    )
                row = await conn.fetchrow(_SELECT + " WHERE b.id = $1", batch_id)
        except UNAVAILABLE as exc:
            raise _down(exc) from exc
        return as_openai(row)

    async def get(self, tenant_id: int, batch_id: str) -> dict[str, Any] | None:
        try:
            row = await self.pool.fetchrow(
                _SELECT + " WHERE b.id = $1 AND b.tenant_id = $2", batch_id, tenant_id
            )
        except UNAVAILABLE as exc:
            raise _down(exc) from exc
        return as_openai(row) if row is not None else None

    async def page(
        self, tenant_id: int | None, after: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        """Newest first (``tenant_id`` None: every tenant's, for the CLI)."""
        try:
            rows = await self.pool.fetch(
                _SELECT + " WHERE ($1::bigint IS NULL OR b.tenant_id = $1)"
                " AND ($2::text IS NULL OR b.seq < (SELECT seq FROM batches WHERE id = $2))"
                " ORDER BY b.seq DESC LIMIT $3",
                tenant_id,
                after,
                limit + 1,
            )
        except UNAVAILABLE as exc:
            raise _down(exc) from exc
        return [as_openai(r) for r in rows[:limit]], len(rows) > limit

    async def owner(self, batch_id: str) -> int | None:
        """The batch's tenant (the CLI acts for any tenant)."""
        try:
            value = await self.pool.fetchval(
                "SELECT tenant_id FROM batches WHERE id = $1", batch_id
            )
        except UNAVAILABLE as exc:
            raise _down(exc) from exc
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
                    await _drop_idle(conn, "cancelled", batch_id)
                row = await conn.fetchrow(
                    _SELECT + " WHERE b.id = $1 AND b.tenant_id = $2", batch_id, tenant_id
                )
        except UNAVAILABLE as exc:
            raise _down(exc) from exc
        return as_openai(row) if row is not None else None

    # --- the workers -----------------------------------------------------

    async def claim(
        self, free: int, batch_limit: int, tenant_limit: int, lease_s: float
    ) -> list[Leased]:
        """Up to ``free`` pending lines, leased for ``lease_s``, keeping each
        batch under ``batch_limit`` and each tenant under ``tenant_limit``
        leased lines (counted across the fleet; two workers claiming at the
        same instant may each fill the same room once). One transaction: a
        claim the worker gave up on (its command timeout, a process starved
        of CPU) is rolled back, instead of leaving lines leased to no one
        until their lease runs out."""
        async with self.pool.acquire() as conn, conn.transaction():
            open_batches = await conn.fetch(
                "SELECT b.id, b.tenant_id, b.key_id, b.endpoint,"
                " (SELECT count(*) FROM batch_lines l WHERE l.batch_id = b.id"
                "  AND l.state = 'pending' AND l.leased_until > now()) AS busy"
                " FROM batches b WHERE b.status = 'in_progress' AND b.expires_at > now()"
                " ORDER BY b.seq"
            )
            tenant_busy: dict[int, int] = {}
            for b in open_batches:
                tenant_busy[b["tenant_id"]] = tenant_busy.get(b["tenant_id"], 0) + b["busy"]
            share = max(1, free // max(1, len(open_batches)))
            out: list[Leased] = []
            for b in open_batches:
                left = free - len(out)
                if left <= 0:
                    break
                room = min(
                    left,
                    share,
                    batch_limit - b["busy"],
                    tenant_limit - tenant_busy[b["tenant_id"]],
                )
                if room <= 0:
                    continue
                rows = await _lease(conn, b, room, lease_s)
                tenant_busy[b["tenant_id"]] += len(rows)
                out.extend(rows)
            return out

    async def finish(self, done: list[tuple[Leased, bool, dict[str, Any]]]) -> int:
        """Write the lines' results (``ok``: the output file, else the error
        file), each once: a line already ended (another worker ran it after
        this one's lease ran out, or its batch was cancelled or expired
        meanwhile) is left as it is. How many were written."""
        status = await self.pool.execute(
            "UPDATE batch_lines l SET state = v.state, result = v.result::jsonb, done_at = now(),"
            " leased_until = NULL"
            " FROM unnest($1::text[], $2::int[], $3::text[], $4::text[])"
            "  AS v(batch_id, line, state, result)"
            " WHERE l.batch_id = v.batch_id AND l.line = v.line AND l.state = 'pending'",
            [x.batch_id for x, _, _ in done],
            [x.line for x, _, _ in done],
            ["completed" if ok else "failed" for _, ok, _ in done],
            [orjson.dumps(result).decode() for _, _, result in done],
        )
        return int(status.split()[-1])

    async def billed_in(self, event_id: str) -> date | None:
        """The month a usage row with this key was written in, if any: this
        month's partition or the one before (a batch lives at most 24 h)."""
        try:
            period = await self.pool.fetchval(
                "SELECT period FROM usage_events WHERE event_id = $1"
                " AND period >= (date_trunc('month', now()) - interval '1 month')::date"
                " ORDER BY period LIMIT 1",
                event_id,
            )
        except UNAVAILABLE as exc:
            raise _down(exc) from exc
        return period if isinstance(period, date) else None

    async def defer(self, line: Leased, seconds: float) -> None:
        """Give the line back, to be leased again after ``seconds`` (quota)."""
        await self.pool.execute(
            "UPDATE batch_lines SET leased_until = NULL,"
            " not_before = now() + make_interval(secs => $3)"
            " WHERE batch_id = $1 AND line = $2 AND state = 'pending'",
            line.batch_id,
            line.line,
            seconds,
        )

    async def fail_batch(self, batch_id: str, code: str, message: str) -> None:
        """End a batch that cannot go on (its key was revoked): the lines not
        run fail with ``code``; ``sweep`` writes its files."""
        error = [{"code": code, "message": message, "param": None, "line": None}]
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE batches SET errors = $2 WHERE id = $1 AND status = 'in_progress'",
                batch_id,
                orjson.dumps(error).decode(),
            )
            await _drop_idle(conn, "failed", batch_id, code, message)

    async def sweep(self) -> list[Ended]:
        """Expire what outlived its window, drop the idle lines of cancelled
        batches, and end every batch with no pending line left."""
        ended: list[Ended] = []
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                for (batch_id,) in await conn.fetch(
                    "SELECT id FROM batches WHERE status = 'in_progress' AND expires_at <= now()"
                ):
                    await _drop_idle(
                        conn,
                        "expired",
                        batch_id,
                        "batch_expired",
                        "This request could not be executed before the completion window expired.",
                    )
                for (batch_id,) in await conn.fetch(
                    "SELECT id FROM batches WHERE status = 'cancelling'"
                ):
                    await _drop_idle(conn, "cancelled", batch_id)
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
            row = await conn.fetchrow(_SELECT + " WHERE b.id = $1", b["id"])
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

    async def key_of(self, key_id: str) -> asyncpg.Record | None:
        """The creator key's current state, tenant and tier (None: deleted)."""
        return await self.pool.fetchrow(
            "SELECT k.id, k.prefix, k.state, k.expires_at, t.id AS tenant_id, t.name AS tenant,"
            " coalesce(k.tier, t.tier) AS tier, t.budgets AS tenant_budgets,"
            " k.budgets AS key_budgets"
            " FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.id = $1",
            key_id,
        )

    async def expire_files(self) -> int:
        """Delete the files past their retention (``batches.file_retention_days``)."""
        return await files.FileStore(self.pool).sweep()

    async def queue(self) -> tuple[int, float]:
        """Pending lines of open batches, and the oldest one's age in seconds."""
        row = await self.pool.fetchrow(
            "SELECT count(*) AS n,"
            " coalesce(extract(epoch FROM now() - min(b.created_at)), 0) AS age"
            " FROM batch_lines l JOIN batches b ON b.id = l.batch_id"
            " WHERE l.state = 'pending' AND b.status IN ('in_progress', 'cancelling')"
        )
        return int(row["n"]), float(row["age"])


# MATERIALIZED: the pick runs once. As a subquery in FROM the planner may
# rescan it (a nested loop, once the table's statistics grow past ~20k
# lines), and each rescan skips the rows the last one locked and picks
# ``room`` more: one claim leased whole batches, thousands of lines at once.
_LEASE = (
    "WITH c AS MATERIALIZED (SELECT line FROM batch_lines"
    "   WHERE batch_id = $1 AND state = 'pending' AND not_before <= now()"
    "   AND (leased_until IS NULL OR leased_until < now())"
    "   ORDER BY line LIMIT $2 FOR UPDATE SKIP LOCKED)"
    " UPDATE batch_lines l SET leased_until = now() + make_interval(secs => $3),"
    " attempts = l.attempts + 1"
    " FROM c WHERE l.batch_id = $1 AND l.line = c.line"
    " RETURNING l.line, l.custom_id, l.body, l.attempts"
)


async def _lease(
    conn: asyncpg.Connection, batch: asyncpg.Record, room: int, lease_s: float
) -> list[Leased]:
    """Up to ``room`` of the batch's pending lines, leased for ``lease_s``."""
    rows = await conn.fetch(_LEASE, batch["id"], room, lease_s)
    return [
        Leased(
            batch["id"],
            r["line"],
            r["custom_id"],
            orjson.loads(r["body"]),
            batch["tenant_id"],
            batch["key_id"],
            batch["endpoint"],
            r["attempts"],
        )
        for r in rows
    ]


async def _drop_idle(
    conn: asyncpg.Connection, state: str, batch_id: str, code: str = "", message: str = ""
) -> None:
    """End the batch's pending lines no live lease holds; an error line when ``code``."""
    await conn.execute(
        "UPDATE batch_lines SET state = $2, done_at = now(), leased_until = NULL,"
        " result = CASE WHEN $3::text = '' THEN NULL ELSE jsonb_build_object("
        "  'id', 'batch_req_' || substr(encode(sha256(convert_to(batch_id || ':' || line, 'UTF8')),"
        "   'hex'), 1, 24),"
        "  'custom_id', custom_id, 'response', NULL,"
        "  'error', jsonb_build_object('code', $3::text, 'message', $4::text)) END"
        " WHERE batch_id = $1 AND state = 'pending'"
        " AND (leased_until IS NULL OR leased_until < now())",
        batch_id,
        state,
        code,
        message,
    )
