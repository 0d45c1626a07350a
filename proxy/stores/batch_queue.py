"""The durable queue of batch lines: what the workers lease, run and give back.

Any worker of any instance leases pending lines with ``FOR UPDATE SKIP
LOCKED`` (``claim``): the lease (``leased_until``) is the only claim, so a
killed worker's lines are leased again once it runs out. A line's result is
written once (``finish`` only moves a pending line). How many lines are
leased at once per batch and per tenant is counted here, across the fleet,
from the unexpired leases.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

import asyncpg
import orjson

from proxy.stores.batch_rows import down
from proxy.stores.pgwait import UNAVAILABLE


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


class LineQueue:
    """The workers' side of ``BatchStore``."""

    pool: asyncpg.Pool

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
            raise down(exc) from exc
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
            await drop_idle(conn, "failed", batch_id, code, message)

    async def key_of(self, key_id: str) -> asyncpg.Record | None:
        """The creator key's current state, tenant and tier (None: deleted)."""
        return await self.pool.fetchrow(
            "SELECT k.id, k.prefix, k.state, k.expires_at, t.id AS tenant_id, t.name AS tenant,"
            " coalesce(k.tier, t.tier) AS tier, t.budgets AS tenant_budgets,"
            " k.budgets AS key_budgets"
            " FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.id = $1",
            key_id,
        )

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


async def drop_idle(
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
