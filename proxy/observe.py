"""Observability wiring: the settle-side observers and ``GET /metrics``.

``observe_ctx`` runs after billing has installed its settler and wraps it:
every ``UsageRecord`` is settled by billing first, then feeds the metrics and
the access log (an observer's failure is logged, never the request's). The
scrape handler refreshes the gauges that are read, not counted (in-flight,
breakers, spool, config version) and answers for the whole instance when
several workers share the port (``proxy.metrics_share``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from proxy.access_log import AccessLog
from proxy.billing import cost_of
from proxy.metrics import Metrics, breaker_states, target_keys, text
from proxy.metrics_share import PUBLISH_INTERVAL, MetricsShare
from proxy.settle import Settler, UsageRecord
from proxy.state import (
    BILLING,
    CONFIG,
    LIFECYCLE,
    LIMITER,
    METRICS,
    METRICS_SHARE,
    REDIS,
    SETTLER,
    TASKS,
    UPSTREAMS,
)
from proxy.tiers import price_for

log = logging.getLogger("tollway.observe")


class Observed:
    """The settler the pipeline calls: ``inner`` (billing), then the observers."""

    def __init__(self, inner: Settler, metrics: Metrics, access: AccessLog) -> None:
        self.inner = inner
        self._metrics = metrics
        self._access = access

    def settle(self, record: UsageRecord) -> None:
        try:
            self.inner.settle(record)
        finally:
            try:
                cost = cost_of(record)
                self._metrics.observe(record, cost)
                # null only for a model without a price; a price of 0 costs 0.0
                self._access.observe(record, float(cost) if cost or _priced(record) else None)
            except Exception:
                log.exception("observing request %s failed", record.request_id)


def _priced(record: UsageRecord) -> bool:
    prices = record.config.prices if record.config is not None else {}
    return price_for(prices, record.public_model) is not None


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
    redis = app.get(REDIS)
    if redis is not None:
        metrics.set_redis(redis.up, redis.errors, app[LIMITER].fallbacks)


async def metrics_handler(request: web.Request) -> web.Response:
    app = request.app
    await collect(app)
    share = app.get(METRICS_SHARE)
    return text(share.merged(app[METRICS]) if share is not None else app[METRICS].registry)


def observe_ctx(share_dir: Path | None) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        app[SETTLER] = Observed(app[SETTLER], app[METRICS], AccessLog())
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
        except OSError as exc:
            log.warning("cannot publish metrics for the other workers: %s", exc)
        await asyncio.sleep(PUBLISH_INTERVAL)
