"""The tenant event log as one ``cleanup_ctx`` resource: the sink, its
LISTEN connection, the webhook deliverer and the retention sweeper.

``app[EVENTS]`` is the one ``EventSink`` of the app (also lent to stages
as ``Services.events``): an ``EventLog`` when the gateway has a database,
``NoEvents`` without one. The log has a small pool of its own, so a burst
of stream replays or webhook bookkeeping never waits behind (or holds up)
the billing pool of the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable

import asyncpg
from aiohttp import web

from proxy.config.sealed import MASTER_KEY_ENV, SealError
from proxy.core.events import NoEvents
from proxy.stages.settle.events import EventSettings, EventsStage
from proxy.stages.settle.webhook_delivery import Deliverer
from proxy.stores import pgdsn, webhooks
from proxy.stores.events import EventLog
from proxy.stores.pgwait import UNAVAILABLE
from proxy.web.keys import CONFIG, DELIVERER, EVENTS, HTTP, METRICS, TASKS

log = logging.getLogger("tollway.events")
POOL_SIZE = 3
_SWEEP_EVERY_S = 3600.0


def event_settings(app: web.Application) -> EventSettings:
    """The live config's ``events:`` (the defaults when no stage owns it)."""
    settings = app[CONFIG].current.config.section(EventsStage.name)
    return settings if isinstance(settings, EventSettings) else EventSettings()


def events_ctx(database_url: str | None) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        if database_url is None:
            app[EVENTS] = NoEvents()
            yield
            return
        pool = await asyncpg.create_pool(
            **pgdsn.options(database_url),
            min_size=1,
            max_size=POOL_SIZE,
            timeout=5,
            command_timeout=10,
        )
        assert pool is not None
        await _seal_secrets(pool)
        events = EventLog(pool, database_url)
        deliverer = Deliverer(
            pool, app[HTTP], lambda: event_settings(app).webhooks, app.get(METRICS)
        )
        events.on_notify.append(deliverer.wake)
        app[EVENTS] = events
        app[DELIVERER] = deliverer
        events.start(app[TASKS])
        loops = [
            app[TASKS].spawn(deliverer.run(), name="webhooks"),
            app[TASKS].spawn(_sweep(events, app), name="events-sweep"),
        ]
        try:
            yield
        finally:
            for task in loops:
                task.cancel()
            for task in loops:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await events.close()
            await pool.close()

    return ctx


async def _seal_secrets(pool: asyncpg.Pool) -> None:
    """Webhook secrets stored in plaintext are sealed once a master key is set."""
    try:
        sealed_now = await webhooks.seal_plaintext(pool)
        if sealed_now:
            log.info("webhooks: %d secret(s) stored in plaintext are now sealed", sealed_now)
        elif not os.environ.get(MASTER_KEY_ENV) and await webhooks.plaintext_count(pool):
            log.warning(
                "webhooks: endpoint secrets are stored in plaintext in Postgres;"
                " set %s to store them sealed",
                MASTER_KEY_ENV,
            )
    except SealError as exc:
        log.error("webhooks: cannot seal the stored secrets: %s", exc)
    except UNAVAILABLE as exc:
        log.warning("webhooks: could not seal the stored secrets (%s)", exc)


async def _sweep(events: EventLog, app: web.Application) -> None:
    """Each worker sweeps now and then; concurrent sweeps skip each other's rows."""
    while True:
        retention = event_settings(app).retention_days
        try:
            gone = await events.sweep(retention * 86400)
            if gone:
                log.info("events: %d event(s) older than %g days deleted", gone, retention)
        except UNAVAILABLE as exc:
            log.warning("events: the retention sweep failed (%s)", exc)
        await asyncio.sleep(min(_SWEEP_EVERY_S, retention * 86400 / 10))


async def end_streams(app: web.Application) -> None:
    """At shutdown, before the server waits for its handlers: every open
    ``GET /v1/events`` stream ends (1001), so none holds the exit up."""
    events = app.get(EVENTS)
    if isinstance(events, EventLog):
        events.end_all()
