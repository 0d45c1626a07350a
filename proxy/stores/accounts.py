"""Tenants and API keys: the admin operations, shared by CLI and HTTP.

Every change runs in one transaction with its ``audit_log`` row (who, what,
when, before/after). Audit rows and results never contain a key or its
digest; the plain key is returned once, by ``create_key``/``rotate_key``.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from proxy.config.budgets import MICROS, OVERRIDE_KEYS, parse_overrides
from proxy.config.reader import ConfigError
from proxy.stores import apikeys


class AccountError(ValueError):
    """A refused admin operation (unknown tenant, bad tier...); safe to show."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


_KEY_FIELDS = (
    "k.id, k.name, k.prefix, k.tier, k.state, k.created_at, k.expires_at, "
    "k.revoked_at, t.name AS tenant, coalesce(k.tier, t.tier) AS effective_tier, k.budgets"
)


def _jsonable(row: Any) -> dict[str, Any] | None:
    if row is None:
        return None
    return {k: _plain(k, v) for k, v in dict(row).items()}


def _plain(name: str, value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if name == "budgets" and isinstance(value, str):  # asyncpg hands jsonb over as text
        return orjson.loads(value)
    return value


async def _audit(
    conn: asyncpg.Connection, actor: str, action: str, target: str, before: Any, after: Any
) -> None:
    await conn.execute(
        "INSERT INTO audit_log (actor, action, target, before, after)"
        " VALUES ($1, $2, $3, $4::jsonb, $5::jsonb)",
        actor,
        action,
        target,
        None if before is None else orjson.dumps(_jsonable(before)).decode(),
        None if after is None else orjson.dumps(_jsonable(after)).decode(),
    )


def _check_tier(tier: str | None, tiers: Collection[str]) -> None:
    if tier is not None and tier not in tiers:
        raise AccountError(f"unknown tier '{tier}' (known: {', '.join(sorted(tiers))})")


async def create_tenant(
    pool: asyncpg.Pool, name: str, tier: str, tiers: Collection[str], actor: str
) -> dict[str, Any]:
    _check_tier(tier, tiers)
    async with pool.acquire() as conn, conn.transaction():
        try:
            row = await conn.fetchrow(
                "INSERT INTO tenants (name, tier) VALUES ($1, $2)"
                " RETURNING id, name, tier, created_at",
                name,
                tier,
            )
        except asyncpg.UniqueViolationError:
            raise AccountError(f"tenant '{name}' already exists", 409) from None
        except asyncpg.CheckViolationError:
            raise AccountError("tenant names are 1-64 letters, digits, '.', '_' or '-'") from None
        await _audit(conn, actor, "tenant.create", name, None, row)
    return _jsonable(row) or {}


async def set_tier(
    pool: asyncpg.Pool, name: str, tier: str, tiers: Collection[str], actor: str
) -> dict[str, Any]:
    _check_tier(tier, tiers)
    async with pool.acquire() as conn, conn.transaction():
        before = await conn.fetchrow(
            "SELECT id, name, tier FROM tenants WHERE name = $1 FOR UPDATE", name
        )
        if before is None:
            raise AccountError(f"no tenant named '{name}'", 404)
        after = await conn.fetchrow(
            "UPDATE tenants SET tier = $2, updated_at = now() WHERE name = $1"
            " RETURNING id, name, tier",
            name,
            tier,
        )
        await _audit(conn, actor, "tenant.set_tier", name, before, after)
    return _jsonable(after) or {}


async def list_tenants(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await pool.fetch("SELECT id, name, tier, budgets, created_at FROM tenants ORDER BY name")
    return [r for r in map(_jsonable, rows) if r is not None]


async def _insert_key(
    conn: asyncpg.Connection,
    hasher: apikeys.KeyHasher,
    tenant_id: int,
    name: str,
    tier: str | None,
    expires_at: datetime | None,
) -> tuple[str, str]:
    key, key_id = apikeys.generate(), apikeys.new_key_id()
    await conn.execute(
        "INSERT INTO api_keys (id, tenant_id, name, digest, prefix, tier, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)",
        key_id,
        tenant_id,
        name,
        hasher.digest(key),
        apikeys.display_prefix(key),
        tier,
        expires_at,
    )
    return key, key_id


async def _key_row(conn: asyncpg.Connection, key_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {_KEY_FIELDS} FROM api_keys k JOIN tenants t ON t.id = k.tenant_id"
        " WHERE k.id = $1",
        key_id,
    )


async def create_key(
    pool: asyncpg.Pool,
    hasher: apikeys.KeyHasher,
    tenant: str,
    name: str,
    expires_in_days: int | None,
    tier: str | None,
    tiers: Collection[str],
    actor: str,
) -> dict[str, Any]:
    _check_tier(tier, tiers)
    if expires_in_days is not None and expires_in_days <= 0:
        raise AccountError("expires_in_days must be a positive number of days")
    expires = (datetime.now(UTC) + timedelta(days=expires_in_days)) if expires_in_days else None
    async with pool.acquire() as conn, conn.transaction():
        tenant_id = await conn.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
        if tenant_id is None:
            raise AccountError(f"no tenant named '{tenant}'", 404)
        key, key_id = await _insert_key(conn, hasher, tenant_id, name, tier, expires)
        row = await _key_row(conn, key_id)
        await _audit(conn, actor, "key.create", key_id, None, row)
    return {"api_key": key, "key_id": key_id, **_public(row)}


def _public(row: Any) -> dict[str, Any]:
    data = _jsonable(row) or {}
    data["tier"] = data.pop("effective_tier", data.get("tier"))
    data.pop("id", None)
    return data


async def list_keys(pool: asyncpg.Pool, tenant: str | None) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        f"SELECT {_KEY_FIELDS} FROM api_keys k JOIN tenants t ON t.id = k.tenant_id"
        " WHERE $1::text IS NULL OR t.name = $1 ORDER BY k.created_at",
        tenant,
    )
    return [{"key_id": r["id"], **_public(r)} for r in rows]


async def revoke_key(pool: asyncpg.Pool, key_id: str, actor: str) -> dict[str, Any]:
    async with pool.acquire() as conn, conn.transaction():
        before = await _key_row(conn, key_id)
        if before is None:
            raise AccountError(f"no key with id '{key_id}'", 404)
        await conn.execute(
            "UPDATE api_keys SET state = 'revoked', revoked_at = coalesce(revoked_at, now())"
            " WHERE id = $1",
            key_id,
        )
        after = await _key_row(conn, key_id)
        await _audit(conn, actor, "key.revoke", key_id, before, after)
    return {"key_id": key_id, **_public(after)}


async def rotate_key(
    pool: asyncpg.Pool, hasher: apikeys.KeyHasher, key_id: str, actor: str
) -> dict[str, Any]:
    """Issue a new key with the old one's tenant, name, tier and expiry; revoke the old."""
    async with pool.acquire() as conn, conn.transaction():
        old = await conn.fetchrow(
            "SELECT id, tenant_id, name, tier, state, expires_at FROM api_keys"
            " WHERE id = $1 FOR UPDATE",
            key_id,
        )
        if old is None:
            raise AccountError(f"no key with id '{key_id}'", 404)
        if old["state"] != "active":
            raise AccountError(f"key '{key_id}' is revoked; create a new key instead", 409)
        key, new_id = await _insert_key(
            conn, hasher, old["tenant_id"], old["name"], old["tier"], old["expires_at"]
        )
        before = await _key_row(conn, key_id)
        await conn.execute(
            "UPDATE api_keys SET state = 'revoked', revoked_at = now(), replaced_by = $2"
            " WHERE id = $1",
            key_id,
            new_id,
        )
        row = await _key_row(conn, new_id)
        await _audit(conn, actor, "key.rotate", key_id, before, {"replaced_by": new_id})
    return {"api_key": key, "key_id": new_id, "replaces": key_id, **_public(row)}


def budget_changes(raw: Any) -> dict[str, float | None] | None:
    """Validated overrides as they are stored (USD numbers; None: "no budget").

    ``None`` (JSON null) clears every override, so the tier's budgets apply
    again; an object changes only the names it has (``monthly_usd``,
    ``daily_usd``), each a number of USD >= 0 or null for "no budget".
    """
    if raw is None:
        return None
    try:
        parsed = parse_overrides(raw, "budgets")
    except ConfigError as exc:
        raise AccountError(str(exc)) from None
    if not parsed:
        raise AccountError(f"budgets: name at least one of {', '.join(OVERRIDE_KEYS)}, or null")
    return {k: None if v is None else v / MICROS for k, v in parsed.items()}


def _merged(old: str | None, changes: dict[str, float | None] | None) -> str | None:
    if changes is None:
        return None
    merged = {**(orjson.loads(old) if old else {}), **changes}
    return orjson.dumps({k: merged[k] for k in OVERRIDE_KEYS if k in merged}).decode()


async def set_tenant_budgets(
    pool: asyncpg.Pool, name: str, changes: dict[str, float | None] | None, actor: str
) -> dict[str, Any]:
    """Change a tenant's own budgets (``budget_changes``); workers read them
    with the key, so they apply within ``key_cache_ttl_s``."""
    async with pool.acquire() as conn, conn.transaction():
        before = await conn.fetchrow(
            "SELECT id, name, tier, budgets FROM tenants WHERE name = $1 FOR UPDATE", name
        )
        if before is None:
            raise AccountError(f"no tenant named '{name}'", 404)
        after = await conn.fetchrow(
            "UPDATE tenants SET budgets = $2::jsonb, updated_at = now() WHERE name = $1"
            " RETURNING id, name, tier, budgets",
            name,
            _merged(before["budgets"], changes),
        )
        await _audit(conn, actor, "tenant.set_budgets", name, before, after)
    return _jsonable(after) or {}


async def set_key_budgets(
    pool: asyncpg.Pool, key_id: str, changes: dict[str, float | None] | None, actor: str
) -> dict[str, Any]:
    """Change a key's own budgets, as ``set_tenant_budgets`` does a tenant's."""
    async with pool.acquire() as conn, conn.transaction():
        old = await conn.fetchval("SELECT budgets FROM api_keys WHERE id = $1 FOR UPDATE", key_id)
        before = await _key_row(conn, key_id)
        if before is None:
            raise AccountError(f"no key with id '{key_id}'", 404)
        await conn.execute(
            "UPDATE api_keys SET budgets = $2::jsonb WHERE id = $1",
            key_id,
            _merged(old, changes),
        )
        after = await _key_row(conn, key_id)
        await _audit(conn, actor, "key.set_budgets", key_id, before, after)
    return {"key_id": key_id, **_public(after)}
