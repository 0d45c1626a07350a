"""Observability wiring: ``GET /metrics`` and the workers' shared metrics.

The metrics and the access log are settlers (``proxy.web.app`` builds the
tuple); this module only serves what they counted. The scrape handler
refreshes the gauges that are read, not counted (in-flight, breakers,
spool, config version, the event log's streams and webhook queue) and
answers for the whole instance when several workers share the port (``proxy.web.metrics_share``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from proxy.core.prometheus import text
from proxy.stages.settle.metric_families import breaker_states, target_keys
from proxy.stores import webhooks
from proxy.stores.events import EventLog
from proxy.stores.pgwait import UNAVAILABLE
from proxy.web.keys import (
    AUTH_GUARD,
    BILLING,
    CONFIG,
    EVENTS,
    GUARD_STATS,
    LIFECYCLE,
    LIMITER,
    METRICS,
    METRICS_SHARE,
    REDIS,
    TASKS,
    UPSTREAMS,
)
from proxy.web.metrics_share import PUBLISH_INTERVAL, MetricsShare

log = logging.getLogger("tollway.observe")
_PENDING_TIMEOUT_S = 1.0  # a slow database must not hold the scrape up


async def collect(app: web.Application) -> None:
    """Set the gauges that are read at scrape time."""
    metrics = app[METRICS]
    metrics.flush()
    snap = app[CONFIG].current
    lifecycle = app[LIFECYCLE]
    keys = list(dict.fromkeys([*target_keys(snap.config), *metrics.targets]))
    health = await app[UPSTREAMS].breakers.health(keys) if keys else {}
    billing = app.get(BILLING)
    metrics.set_gauges(
        inflight=lifecycle.requests,
        streams=lifecycle.streams,
        version=snap.config.version,
        spool=billing.ledger.pending() if billing is not None else 0,
        lag=billing.ledger.lag() if billing is not None else 0.0,
        breakers=breaker_states(dict(health)),
    )
    if billing is not None:
        metrics.set_dead_letters(billing.ledger.dead_lettered)
    guard = app[GUARD_STATS]
    refusals = {
        "header_timeout": guard.header_timeouts,
        "body_timeout": guard.body_timeouts,
        "malformed": guard.malformed,
    }
    metrics.set_guard(guard.open, guard.refused, refusals, app[AUTH_GUARD].throttled)
    redis = app.get(REDIS)
    if redis is not None:
        metrics.set_redis(redis.up, redis.errors, app[LIMITER].fallbacks)
    events = app.get(EVENTS)
    if isinstance(events, EventLog):
        pending: int | None = None
        with contextlib.suppress(*UNAVAILABLE):
            async with asyncio.timeout(_PENDING_TIMEOUT_S):
                pending = await webhooks.pending(events.pool)
        metrics.set_events(events.open_streams(), events.published, pending)


async def metrics_handler(request: web.Request) -> web.Response:
    app = request.app
    await collect(app)
    share = app.get(METRICS_SHARE)
    return text(share.merged(app[METRICS]) if share is not None else app[METRICS].registry)


def observe_ctx(share_dir: Path | None) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        publisher = None
        if share_dir is not None:
            share = app[METRICS_SHARE] = MetricsShare(share_dir)
            publisher = app[TASKS].spawn(_publish(app, share), name="metrics-publish")
        yield
        if publisher is not None:
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
            await collect(app)
            app[METRICS_SHARE].publish(app[METRICS])  # the final counts outlive the worker

    return ctx


async def _publish(app: web.Application, share: MetricsShare) -> None:
    while True:
        try:
            await collect(app)
            share.publish(app[METRICS])
        except Exception as exc:  # noqa: BLE001 - a failed round must not end the publishing
            # (a batch process reads these to yield to interactive traffic)
            log.warning("cannot publish metrics for the other workers: %r", exc)
        await asyncio.sleep(PUBLISH_INTERVAL)
