"""Stored responses over HTTP: ``GET``/``DELETE /v1/responses/{id}``, and the
store behind them (and behind ``previous_response_id``), opened on the
billing database with its sweeper.

Stored responses need the database; without one (``auth: none`` and no
``DATABASE_URL``) nothing is kept and every id is not found. They are kept
``TOLLWAY_RESPONSES_RETENTION_DAYS`` days (default 30, OpenAI's own), then
swept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

from aiohttp import web

from proxy.config.model import BillingPolicy
from proxy.core.errors import NotFound, ServiceUnavailable
from proxy.doors.base import DoorServices
from proxy.pipeline.runtime import PRINCIPAL
from proxy.stores.pgwait import DatabaseDown
from proxy.stores.responses import ResponseStore
from proxy.web.keys import BILLING, CONFIG, TASKS

log = logging.getLogger("tollway.responses")

RETENTION_ENV = "TOLLWAY_RESPONSES_RETENTION_DAYS"
DEFAULT_RETENTION_DAYS = 30.0
SWEEP_INTERVAL_S = 300.0

DOOR_SERVICES = web.AppKey("door_services", DoorServices)


def retention_s() -> float:
    raw = os.environ.get(RETENTION_ENV, "").strip()
    days = float(raw) if raw else DEFAULT_RETENTION_DAYS
    if days <= 0:
        raise ValueError(f"{RETENTION_ENV} must be a positive number of days")
    return days * 86400


async def services_ctx(app: web.Application) -> AsyncIterator[None]:
    """After billing (its pool): the doors' services, and the sweeper."""
    billing = app.get(BILLING)
    if billing is None:
        app[DOOR_SERVICES] = DoorServices()
        yield
        return
    policy = app[CONFIG].current.config.billing or BillingPolicy()
    store = ResponseStore(billing.auth.pool, retention_s(), policy.db_timeout_s)
    app[DOOR_SERVICES] = DoorServices(responses=store)
    sweeper = app[TASKS].spawn(_sweep(store), name="responses-sweeper")
    yield
    sweeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sweeper


async def _sweep(store: ResponseStore) -> None:
    while True:
        try:
            while await store.sweep() > 0:
                pass
        except DatabaseDown as exc:
            log.warning("stored responses were not swept: %s", exc)
        await asyncio.sleep(SWEEP_INTERVAL_S)


def _scope(request: web.Request) -> str:
    """The owner's scope, as the pipeline's ``Exchange.scope`` names it."""
    who = request.get(PRINCIPAL)
    return f"t{who.tenant_id}" if who is not None else "gw"


def _store(request: web.Request) -> ResponseStore | None:
    services = request.app.get(DOOR_SERVICES)
    return services.responses if services is not None else None


async def get_response(request: web.Request) -> web.Response:
    response_id = request.match_info["id"]
    store = _store(request)
    try:
        found = None if store is None else await store.get(_scope(request), response_id)
    except DatabaseDown:
        raise ServiceUnavailable("Stored responses cannot be read right now.") from None
    if found is None:
        raise NotFound(f"Response with id '{response_id}' not found.")
    return web.Response(body=found.body, content_type="application/json")


async def delete_response(request: web.Request) -> web.Response:
    response_id = request.match_info["id"]
    store = _store(request)
    try:
        gone = store is not None and await store.delete(_scope(request), response_id)
    except DatabaseDown:
        raise ServiceUnavailable("Stored responses cannot be deleted right now.") from None
    if not gone:
        raise NotFound(f"Response with id '{response_id}' not found.")
    body = {"id": response_id, "object": "response.deleted", "deleted": True}
    return web.json_response(body)
