"""Opening the Files and Batch APIs as one ``cleanup_ctx`` resource: their
stores on the billing pool, and this worker process's batch worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

from aiohttp import web

from proxy.pipeline.batch_worker import BatchWorker
from proxy.stores.batches import BatchStore
from proxy.stores.files import FileStore
from proxy.web.keys import BATCH_WORKER, BATCHES, BILLING, CONFIG, EVENTS, FILES, METRICS, RUNTIME

STOP_GRACE_S = 10.0  # running lines may finish this long at shutdown; the rest go back


def batches_ctx() -> Callable[[web.Application], AsyncIterator[None]]:
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
        metrics = app[METRICS]
        worker = app[BATCH_WORKER] = BatchWorker(
            store,
            app[RUNTIME],
            lambda: app[CONFIG].current.config.batches,
            app[EVENTS],
            on_line=metrics.batch_line,
            on_queue=metrics.set_batch_queue,
        )
        runner = asyncio.get_running_loop().create_task(worker.run(), name="batch-worker")
        yield
        await worker.stop(STOP_GRACE_S)
        await runner

    return ctx
