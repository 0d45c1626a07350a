"""Opening the Files and Batch APIs as one ``cleanup_ctx`` resource: their
stores on the billing pool, and, where this process runs lines, its batch
worker.

Where lines run is the process's ``BatchRole``: ``inline`` (a single
``tollway serve``: HTTP and lines on one event loop, the lines yielding to
interactive requests), ``http`` (a supervisor's HTTP worker beside batch
processes: no lines here) or ``lines`` (a supervisor's batch process: lines
only, no HTTP, throttled to ``busy_concurrency`` while the HTTP workers
report requests in flight through the shared metrics). A batch process is
woken by the event log's notifications (a batch created on any worker
publishes one), else it polls every ``poll_interval_s``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Literal

from aiohttp import web

from proxy.pipeline.batch_worker import BatchWorker
from proxy.stores.batches import BatchStore
from proxy.stores.events import EventLog
from proxy.stores.files import FileStore
from proxy.web.keys import (
    BATCH_WORKER,
    BATCHES,
    BILLING,
    CONFIG,
    EVENTS,
    FILES,
    METRICS,
    METRICS_SHARE,
    RUNTIME,
)
from proxy.web.metrics_share import PUBLISH_INTERVAL, MetricsShare

STOP_GRACE_S = 10.0  # running lines may finish this long at shutdown; the rest go back
BatchRole = Literal["inline", "http", "lines"]


def batches_ctx(role: BatchRole = "inline") -> Callable[[web.Application], AsyncIterator[None]]:
    """After the event log (``events_ctx``): the worker publishes its jobs' events there."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        billing = app.get(BILLING)
        if billing is None:  # no database: the APIs answer 404
            yield
            return
        pool = billing.auth.pool
        policy = app[CONFIG].current.config.batches
        app[FILES] = FileStore(pool)
        store = app[BATCHES] = BatchStore(pool, timedelta(days=policy.file_retention_days))
        if role == "http":  # the batch processes run the lines
            yield
            return
        metrics = app[METRICS]
        share = app.get(METRICS_SHARE)  # a supervisor's worker: the instance's metrics
        worker = app[BATCH_WORKER] = BatchWorker(
            store,
            app[RUNTIME],
            lambda: app[CONFIG].current.config.batches,
            app[EVENTS],
            on_line=metrics.batch_line,
            on_queue=metrics.set_batch_queue,
            busy=_http_busy(share) if role == "lines" and share is not None else None,
        )
        events = app[EVENTS]
        if role == "lines" and isinstance(events, EventLog):
            events.on_notify.append(worker.wake)  # a batch made on an HTTP worker
        runner = asyncio.get_running_loop().create_task(worker.run(), name="batch-worker")
        yield
        await worker.stop(STOP_GRACE_S)
        await runner

    return ctx


BUSY_LOOK_S = 0.5  # how often a batch process reads the HTTP workers' in-flight counts
BUSY_HOLD_S = 2 * PUBLISH_INTERVAL + BUSY_LOOK_S  # answered requests this recent: still busy


def _http_busy(share: MetricsShare) -> Callable[[], bool]:
    """Whether the instance's HTTP workers had requests in flight at their
    last metrics publish, or answered any within the last ``BUSY_HOLD_S``
    (fast requests come and go between two publishes); read every
    ``BUSY_LOOK_S``."""
    answered, moved_at, looked, busy_now = -1.0, -BUSY_HOLD_S, -BUSY_LOOK_S, False

    def busy() -> bool:
        nonlocal answered, moved_at, looked, busy_now
        now = time.monotonic()
        if now - looked >= BUSY_LOOK_S:
            inflight, total = share.traffic_elsewhere()
            if answered >= 0 and total != answered:
                moved_at = now
            answered, looked = total, now
            busy_now = inflight > 0 or now - moved_at < BUSY_HOLD_S
        return busy_now

    return busy
