"""A tenant's webhook endpoints and the queue of their deliveries.

Endpoints are set by the operator (CLI ``tollway webhooks``, admin API
``/admin/tenants/{name}/webhooks``), audited like every account change. The
secret is returned once, when the endpoint is added, and never listed.

The secret must be at hand to sign each delivery, so it cannot be hashed;
with ``TOLLWAY_MASTER_KEY`` set it is stored sealed with it, the way a
config file holds provider keys (``proxy.config.sealed``): a dump of the
database alone does not reveal it. A row written in plaintext (before the
key was set) still works, and ``seal_plaintext`` seals it at the next start.

Deliveries are rows of ``webhook_deliveries``, written with the event
(``proxy.stores.events.EventLog.record``). A worker ``claim``s due ones by
moving their ``next_at`` past the attempt's deadline, so two workers never
send the same attempt and a crashed worker's claim runs out by itself; it
then ``finish``es each attempt, which is recorded in ``webhook_attempts``.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from proxy.config import sealed
from proxy.core import webhooks
from proxy.stores.accounts import AccountError, _audit, _jsonable
from proxy.stores.events import WEBHOOK_TYPES

_MAX_URL = 2048


def new_secret() -> str:
    return webhooks.PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _check(url: str, types: Sequence[str], secret: str) -> None:
    if not url.startswith(("http://", "https://")) or len(url) > _MAX_URL or " " in url:
        raise AccountError("the webhook url must be an http(s) URL of at most 2048 characters")
    unknown = [t for t in types if t not in WEBHOOK_TYPES]
    if unknown or not types:
        raise AccountError(
            f"unknown webhook event type '{unknown[0] if unknown else ''}'"
            f" (allowed: {', '.join(WEBHOOK_TYPES)})"
        )
    try:
        webhooks.secret_key(secret)
    except ValueError as exc:
        raise AccountError(f"bad webhook secret: {exc} (whsec_<base64>)") from None


def _master_key() -> str | None:
    return os.environ.get(sealed.MASTER_KEY_ENV) or None


def stored_secret(secret: str) -> str:
    """What the row holds: the secret sealed when there is a master key."""
    key = _master_key()
    return sealed.seal(secret, key) if key else secret


def open_secret(stored: str) -> str:
    """The signing secret of a row (``SealError``, a ValueError, when it
    cannot be opened: no master key, or another one)."""
    return sealed.open_sealed(stored, _master_key()) if sealed.is_sealed(stored) else stored


async def seal_plaintext(pool: asyncpg.Pool) -> int:
    """Seal the secrets stored in plaintext; how many were (0 without a key).
    Several workers may run it at once: a row sealed by one is skipped by
    the others (it no longer matches)."""
    key = _master_key()
    if key is None:
        return 0
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            "SELECT id, secret FROM webhook_endpoints WHERE secret NOT LIKE $1"
            " FOR UPDATE SKIP LOCKED",
            sealed.PREFIX + "%",
        )
        for row in rows:
            await conn.execute(
                "UPDATE webhook_endpoints SET secret = $2 WHERE id = $1",
                row["id"],
                sealed.seal(row["secret"], key),
            )
    return len(rows)


async def plaintext_count(pool: asyncpg.Pool) -> int:
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM webhook_endpoints WHERE secret NOT LIKE $1",
            sealed.PREFIX + "%",
        )
    )


_PUBLIC = "e.id, t.name AS tenant, e.url, e.event_types, e.created_at"


async def add_endpoint(
    pool: asyncpg.Pool,
    tenant: str,
    url: str,
    types: Sequence[str] | None,
    secret: str | None,
    actor: str,
) -> dict[str, Any]:
    """The new endpoint, with its secret (shown only here)."""
    chosen = list(dict.fromkeys(types)) if types else list(WEBHOOK_TYPES)
    secret = secret or new_secret()
    _check(url, chosen, secret)
    try:
        kept = stored_secret(secret)
    except sealed.SealError as exc:
        raise AccountError(f"cannot seal the webhook secret: {exc}", 500) from None
    async with pool.acquire() as conn, conn.transaction():
        tid = await conn.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
        if tid is None:
            raise AccountError(f"no tenant named '{tenant}'", 404)
        endpoint_id = f"we_{secrets.token_hex(8)}"
        await conn.execute(
            "INSERT INTO webhook_endpoints (id, tenant_id, url, secret, event_types)"
            " VALUES ($1, $2, $3, $4, $5)",
            endpoint_id,
            tid,
            url,
            kept,
            chosen,
        )
        row = await conn.fetchrow(
            f"SELECT {_PUBLIC} FROM webhook_endpoints e JOIN tenants t ON t.id = e.tenant_id"
            " WHERE e.id = $1",
            endpoint_id,
        )
        await _audit(conn, actor, "webhook.add", tenant, None, row)
    return {**(_jsonable(row) or {}), "secret": secret}


async def list_endpoints(pool: asyncpg.Pool, tenant: str) -> list[dict[str, Any]]:
    if await pool.fetchval("SELECT id FROM tenants WHERE name = $1", tenant) is None:
        raise AccountError(f"no tenant named '{tenant}'", 404)
    rows = await pool.fetch(
        f"SELECT {_PUBLIC} FROM webhook_endpoints e JOIN tenants t ON t.id = e.tenant_id"
        " WHERE t.name = $1 ORDER BY e.created_at, e.id",
        tenant,
    )
    return [_jsonable(r) or {} for r in rows]


async def remove_endpoint(
    pool: asyncpg.Pool, endpoint_id: str, actor: str, tenant: str | None = None
) -> dict[str, Any]:
    """Its pending deliveries go with it. ``tenant``: refuse another tenant's."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"SELECT {_PUBLIC} FROM webhook_endpoints e JOIN tenants t ON t.id = e.tenant_id"
            " WHERE e.id = $1 FOR UPDATE OF e",
            endpoint_id,
        )
        if row is None or (tenant is not None and row["tenant"] != tenant):
            raise AccountError(f"no webhook endpoint '{endpoint_id}'", 404)
        await conn.execute("DELETE FROM webhook_endpoints WHERE id = $1", endpoint_id)
        await _audit(conn, actor, "webhook.remove", row["tenant"], row, None)
    return {**(_jsonable(row) or {}), "removed": True}


async def deliveries(pool: asyncpg.Pool, endpoint_id: str, limit: int = 50) -> list[dict[str, Any]]:
    """An endpoint's latest deliveries, each with its attempts."""
    rows = await pool.fetch(
        "SELECT v.event_id AS cursor, ev.event_id, ev.type, v.state, v.attempts, v.next_at,"
        " v.last_status, v.last_error, v.delivered_at,"
        " coalesce((SELECT jsonb_agg(jsonb_build_object('attempt', a.attempt,"
        "  'status_code', a.status_code, 'error', a.error, 'attempted_at', a.attempted_at,"
        "  'next_at', a.next_at, 'delivered_at', a.delivered_at) ORDER BY a.attempt)"
        "  FROM webhook_attempts a WHERE a.event_id = v.event_id"
        "  AND a.endpoint_id = v.endpoint_id), '[]'::jsonb) AS attempt_log"
        " FROM webhook_deliveries v JOIN tenant_events ev ON ev.id = v.event_id"
        " WHERE v.endpoint_id = $1 ORDER BY v.event_id DESC LIMIT $2",
        endpoint_id,
        limit,
    )
    out = []
    for r in rows:
        item = _jsonable(r) or {}
        item["attempt_log"] = orjson.loads(r["attempt_log"])
        out.append(item)
    return out


@dataclass(frozen=True, slots=True)
class Delivery:
    """One claimed attempt: what to send, where, and with which key
    (``secret`` as stored: maybe sealed, see ``open_secret``)."""

    event: int  # the event's cursor id
    endpoint_id: str
    url: str
    secret: str
    attempt: int  # 1 for the first
    event_id: str  # evt_...
    type: str
    data: dict[str, Any]
    created_at: datetime

    def body(self) -> bytes:
        """OpenAI's webhook event: the object's id only, as OpenAI sends it."""
        ref = self.data.get("id")
        return orjson.dumps(
            {
                "id": self.event_id,
                "object": "event",
                "type": self.type,
                "created_at": int(self.created_at.timestamp()),
                "data": {"id": ref} if ref is not None else {},
            }
        )


async def claim(pool: asyncpg.Pool, limit: int, lease_s: float) -> list[Delivery]:
    rows = await pool.fetch(
        "WITH due AS MATERIALIZED (SELECT event_id, endpoint_id FROM webhook_deliveries"
        "  WHERE state = 'pending' AND next_at <= now()"
        "  ORDER BY next_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
        " UPDATE webhook_deliveries v SET attempts = v.attempts + 1,"
        "  next_at = now() + make_interval(secs => $2)"
        " FROM due, webhook_endpoints e, tenant_events ev"
        " WHERE v.event_id = due.event_id AND v.endpoint_id = due.endpoint_id"
        "  AND e.id = v.endpoint_id AND ev.id = v.event_id"
        " RETURNING v.event_id, v.endpoint_id, e.url, e.secret, v.attempts,"
        "  ev.event_id AS evt, ev.type, ev.data, ev.created_at",
        limit,
        float(lease_s),
    )
    out = []
    for r in rows:
        data = r["data"]
        out.append(
            Delivery(
                r["event_id"],
                r["endpoint_id"],
                r["url"],
                r["secret"],
                r["attempts"],
                r["evt"],
                r["type"],
                orjson.loads(data) if isinstance(data, str) else data,
                r["created_at"],
            )
        )
    return out


async def finish(
    pool: asyncpg.Pool,
    d: Delivery,
    status_code: int | None,
    error: str | None,
    retry_in_s: float | None,
) -> None:
    """Record the attempt; ``retry_in_s`` None with an error: no attempt is left."""
    delivered = error is None
    state = "delivered" if delivered else ("pending" if retry_in_s is not None else "failed")
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "UPDATE webhook_deliveries SET state = $3, last_status = $4, last_error = $5,"
            " next_at = CASE WHEN $6::float8 IS NULL THEN next_at"
            "  ELSE now() + make_interval(secs => $6::float8) END,"
            " delivered_at = CASE WHEN $7 THEN now() END"
            " WHERE event_id = $1 AND endpoint_id = $2",
            d.event,
            d.endpoint_id,
            state,
            status_code,
            error,
            retry_in_s,
            delivered,
        )
        await conn.execute(
            "INSERT INTO webhook_attempts"
            " (event_id, endpoint_id, attempt, status_code, error, next_at, delivered_at)"
            " VALUES ($1, $2, $3, $4, $5,"
            "  CASE WHEN $6::float8 IS NULL THEN NULL"
            "   ELSE now() + make_interval(secs => $6::float8) END,"
            "  CASE WHEN $7 THEN now() END)"
            " ON CONFLICT DO NOTHING",
            d.event,
            d.endpoint_id,
            d.attempt,
            status_code,
            error,
            retry_in_s,
            delivered,
        )


async def next_due_in(pool: asyncpg.Pool) -> float | None:
    """Seconds until the earliest pending delivery is due (None: nothing pending)."""
    value = await pool.fetchval(
        "SELECT extract(epoch FROM min(next_at) - now()) FROM webhook_deliveries"
        " WHERE state = 'pending'"
    )
    return None if value is None else max(0.0, float(value))


async def pending(pool: asyncpg.Pool) -> int:
    """Deliveries waiting for an attempt (a partial index holds just these)."""
    return int(
        await pool.fetchval("SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'")
    )
