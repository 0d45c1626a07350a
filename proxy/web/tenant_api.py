"""What the Files and Batch APIs share: both act for the caller's tenant
only, on a Postgres store that exists only with ``auth: keys``, and answer
lists in OpenAI's page shape."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
from aiohttp import web

from proxy.core.errors import InvalidRequest, NotFound, ServiceUnavailable
from proxy.core.principal import Principal
from proxy.pipeline.runtime import PRINCIPAL
from proxy.stores.pgwait import DatabaseDown

log = logging.getLogger("tollway.batches")

T = TypeVar("T")

_NEEDS_KEYS = "The Files and Batch APIs need API keys (auth: keys) and a database."


def caller(request: web.Request) -> Principal:
    """The key's principal: files and batches belong to a tenant."""
    who = request.get(PRINCIPAL)
    if who is None:
        raise NotFound(_NEEDS_KEYS)
    return who


def store(request: web.Request, key: web.AppKey[T]) -> T:
    """The store under ``key``: absent without a database, and then the
    APIs are not there (404) rather than broken."""
    found = request.app.get(key)
    if found is None:
        raise NotFound(_NEEDS_KEYS)
    return found


async def from_db(call: Awaitable[T]) -> T:
    """``call``'s result; the database being down is a 503 to retry."""
    try:
        return await call
    except DatabaseDown as exc:
        raise unavailable(exc) from None


def unavailable(cause: DatabaseDown) -> ServiceUnavailable:
    log.warning("files/batches store unavailable: %s", cause)
    return ServiceUnavailable(
        "The file store is unreachable; please retry shortly.",
        code="database_unavailable",
        headers={"retry-after": "2"},
    )


def json(body: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def limit(request: web.Request, default: int, most: int) -> int:
    """The ``limit`` query parameter, from 1 to ``most``."""
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise InvalidRequest(f"limit must be an integer from 1 to {most}.", param="limit")
    return int(raw)


def page(data: list[dict[str, Any]], more: bool) -> web.Response:
    """One page of a list, in OpenAI's list shape (``after`` the last id)."""
    return json(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": more,
        }
    )
