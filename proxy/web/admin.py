"""``/admin/`` — tenant and key management over HTTP (Bearer ``TOLLWAY_ADMIN_KEY``).

The same operations as the CLI (``proxy.stores.accounts``), each audited with the
actor ``admin-api``. Without ``TOLLWAY_ADMIN_KEY`` the admin API is off (404).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from proxy.config.tiers import Tier
from proxy.core.errors import Conflict, GatewayError, InvalidRequest, NotFound
from proxy.stores import accounts, analytics, pgdsn, semantic_cache
from proxy.web.keys import BILLING, CONFIG

ACTOR = "admin-api"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def rate_limit(tier: Tier | None) -> dict[str, Any]:
    if tier is None:
        return {}
    return {
        "requests_per_hour": tier.requests_per_hour,
        "tokens_per_minute": tier.tokens_per_minute,
        "monthly_requests": tier.monthly_requests,
        "monthly_tokens": tier.monthly_tokens,
        "max_tokens": tier.max_tokens,
        "user_requests_per_hour": tier.user_requests_per_hour,
        "user_tokens_per_minute": tier.user_tokens_per_minute,
    }


# What an account operation's refusal is, by the status the store gave it.
_REFUSALS: dict[int, type[GatewayError]] = {404: NotFound, 409: Conflict}


def _refused(exc: accounts.AccountError) -> GatewayError:
    return _REFUSALS.get(exc.status, InvalidRequest)(str(exc), code="admin_refused")


def _guard(handler: Handler, *, needs_db: bool = True) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        # The admin key was checked by the gate (proxy.web.gate).
        if needs_db and BILLING not in request.app:
            raise NotFound("The admin API is not enabled on this gateway.")
        try:
            return await handler(request)
        except accounts.AccountError as exc:
            raise _refused(exc) from None

    return wrapped


guard = _guard  # for the operations endpoints (proxy.web.reload), which need no database


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError:
        raise InvalidRequest("The admin request body must be JSON.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The admin request body must be a JSON object.")
    return body


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _str(body: dict[str, Any], key: str, required: bool = True) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"'{key}' must be a non-empty string.", param=key)
    return value


async def create_tenant(request: web.Request) -> web.Response:
    body = await _body(request)
    tiers = request.app[CONFIG].current.config.tiers
    row = await accounts.create_tenant(
        request.app[BILLING].auth.pool,
        _str(body, "name") or "",
        _str(body, "tier") or "",
        tiers,
        ACTOR,
    )
    return _json(row, 201)


async def list_tenants(request: web.Request) -> web.Response:
    return _json({"data": await accounts.list_tenants(request.app[BILLING].auth.pool)})


def _only(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise InvalidRequest(
            f"Unknown field '{unknown[0]}' (allowed: {', '.join(allowed)}).", param=unknown[0]
        )
    if not body:
        raise InvalidRequest(f"Give at least one of: {', '.join(allowed)}.")


async def update_tenant(request: web.Request) -> web.Response:
    """``{"tier": ..., "budgets": {...} | null}``: either or both, each audited."""
    body = await _body(request)
    _only(body, ("tier", "budgets"))
    pool, name = request.app[BILLING].auth.pool, request.match_info["name"]
    changes = accounts.budget_changes(body["budgets"]) if "budgets" in body else None
    row: dict[str, Any] = {}
    if "tier" in body:
        tiers = request.app[CONFIG].current.config.tiers
        row = await accounts.set_tier(pool, name, _str(body, "tier") or "", tiers, ACTOR)
    if "budgets" in body:
        row = await accounts.set_tenant_budgets(pool, name, changes, ACTOR)
    return _json(row)


async def update_key(request: web.Request) -> web.Response:
    """``{"budgets": {...} | null}``: the key's own budgets, audited."""
    body = await _body(request)
    _only(body, ("budgets",))
    changes = accounts.budget_changes(body["budgets"])
    row = await accounts.set_key_budgets(
        request.app[BILLING].auth.pool, request.match_info["key_id"], changes, ACTOR
    )
    return _json(row)


async def create_key(request: web.Request) -> web.Response:
    body = await _body(request)
    billing = request.app[BILLING]
    tiers = request.app[CONFIG].current.config.tiers
    days = body.get("expires_in_days")
    if days is not None and (isinstance(days, bool) or not isinstance(days, int)):
        raise InvalidRequest("'expires_in_days' must be an integer.", param="expires_in_days")
    row = await accounts.create_key(
        billing.auth.pool,
        billing.auth.hasher,
        _str(body, "tenant") or "",
        _str(body, "name", required=False) or "",
        days,
        _str(body, "tier", required=False),
        tiers,
        ACTOR,
    )
    row["rate_limit"] = rate_limit(tiers.get(row["tier"]))
    return _json(row, 201)


async def list_keys(request: web.Request) -> web.Response:
    keys = await accounts.list_keys(request.app[BILLING].auth.pool, request.query.get("tenant"))
    return _json({"data": keys})


async def revoke_key(request: web.Request) -> web.Response:
    row = await accounts.revoke_key(
        request.app[BILLING].auth.pool, request.match_info["key_id"], ACTOR
    )
    return _json(row)


async def rotate_key(request: web.Request) -> web.Response:
    billing = request.app[BILLING]
    row = await accounts.rotate_key(
        billing.auth.pool, billing.auth.hasher, request.match_info["key_id"], ACTOR
    )
    return _json(row, 201)


async def usage(request: web.Request) -> web.Response:
    """Spend and usage from the daily rollups (``proxy.stores.analytics``)."""
    billing = request.app[BILLING]
    params = {k: request.query.get(k) for k in ("tenant", "key", "model", "from", "to", "group_by")}
    try:
        query = analytics.query_from(params, billing.quota.clock().date())
    except analytics.BadQuery as exc:
        raise InvalidRequest(str(exc), param=exc.param) from None
    await billing.ledger.flush()  # include this worker's just-finished requests
    rows = await analytics.report(billing.auth.pool, query)
    return _json(
        {
            "object": "list",
            "group_by": query.group_by,
            "from": query.start.isoformat(),
            "to": query.end.isoformat(),
            "data": rows,
        }
    )


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/admin/tenants", _guard(create_tenant))
    r.add_get("/admin/tenants", _guard(list_tenants))
    r.add_patch("/admin/tenants/{name}", _guard(update_tenant))
    r.add_post("/admin/keys", _guard(create_key))
    r.add_get("/admin/keys", _guard(list_keys))
    r.add_patch("/admin/keys/{key_id}", _guard(update_key))
    r.add_post("/admin/keys/{key_id}/revoke", _guard(revoke_key))
    r.add_post("/admin/keys/{key_id}/rotate", _guard(rotate_key))
    r.add_get("/admin/usage", _guard(usage))
    r.add_post("/admin/cache/purge", _guard(purge_semantic_cache))


async def purge_semantic_cache(request: web.Request) -> web.Response:
    """``{"tenant": NAME, "model": optional}``: the tenant's semantic-cache entries go."""
    body = await _body(request)
    pool = request.app[BILLING].auth.pool
    tenant, model = _str(body, "tenant") or "", _str(body, "model", required=False)
    own = os.environ.get("SEMANTIC_CACHE_DATABASE_URL")
    if not own:
        return _json(await semantic_cache.purge_tenant(pool, pool, tenant, model))
    conn = await asyncpg.connect(**pgdsn.options(own), timeout=5)
    try:
        return _json(await semantic_cache.purge_tenant(pool, conn, tenant, model))
    finally:
        await conn.close()
