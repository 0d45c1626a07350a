"""``/admin/tenants/{name}/webhooks``: a tenant's event webhooks over HTTP.

The same operations as ``tollway webhooks`` (``proxy.stores.webhooks``),
audited with the actor ``admin-api``. The endpoint's secret is in the
answer to ``POST`` only.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.core.errors import InvalidRequest
from proxy.stores import webhooks
from proxy.web.admin import ACTOR, _body, _json, guard
from proxy.web.keys import BILLING


def _types(body: dict[str, Any]) -> list[str] | None:
    value = body.get("event_types")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest("'event_types' must be a list of event names.", param="event_types")
    return value


async def add(request: web.Request) -> web.Response:
    """``{"url": ..., "event_types": [...]?, "secret": "whsec_..."?}``"""
    body = await _body(request)
    unknown = sorted(set(body) - {"url", "event_types", "secret"})
    if unknown:
        raise InvalidRequest(f"Unknown field '{unknown[0]}'.", param=unknown[0])
    url, secret = body.get("url"), body.get("secret")
    if not isinstance(url, str):
        raise InvalidRequest("'url' must be a string.", param="url")
    if secret is not None and not isinstance(secret, str):
        raise InvalidRequest("'secret' must be a string.", param="secret")
    row = await webhooks.add_endpoint(
        request.app[BILLING].auth.pool,
        request.match_info["name"],
        url,
        _types(body),
        secret,
        ACTOR,
    )
    return _json(row, 201)


async def list_(request: web.Request) -> web.Response:
    rows = await webhooks.list_endpoints(request.app[BILLING].auth.pool, request.match_info["name"])
    return _json({"data": rows})


async def remove(request: web.Request) -> web.Response:
    row = await webhooks.remove_endpoint(
        request.app[BILLING].auth.pool,
        request.match_info["id"],
        ACTOR,
        tenant=request.match_info["name"],
    )
    return _json(row)


async def deliveries(request: web.Request) -> web.Response:
    """The endpoint's latest deliveries, each with every attempt."""
    pool = request.app[BILLING].auth.pool
    name, endpoint = request.match_info["name"], request.match_info["id"]
    mine = {e["id"] for e in await webhooks.list_endpoints(pool, name)}
    if endpoint not in mine:
        raise webhooks.AccountError(f"no webhook endpoint '{endpoint}'", 404)
    return _json({"data": await webhooks.deliveries(pool, endpoint)})


def add_routes(app: web.Application) -> None:
    r = app.router
    base = "/admin/tenants/{name}/webhooks"
    r.add_post(base, guard(add))
    r.add_get(base, guard(list_))
    r.add_delete(base + "/{id}", guard(remove))
    r.add_get(base + "/{id}/deliveries", guard(deliveries))
