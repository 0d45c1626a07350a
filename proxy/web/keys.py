"""Typed app state: every shared object lives here, never in a module global.

Only the web layer reads these; the pipeline gets what it needs as one
``Runtime`` (``RUNTIME``), built when the app starts.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from proxy.config.model import ServerConfig
from proxy.core.events import EventSink
from proxy.core.lifecycle import Lifecycle
from proxy.core.record import Settler
from proxy.core.tasks import TaskGroup
from proxy.pipeline.batch_worker import BatchWorker
from proxy.pipeline.runtime import REQUEST_ID, Runtime
from proxy.pipeline.snapshot import ConfigStore
from proxy.providers.pool import Pool
from proxy.stages.admit.billing import Billing
from proxy.stages.base import Stage
from proxy.stages.forward.attempts import Upstreams
from proxy.stages.settle.metrics import Metrics
from proxy.stages.settle.webhook_delivery import Deliverer
from proxy.stores.batches import BatchStore
from proxy.stores.files import FileStore
from proxy.stores.ratelimit import RateLimiter
from proxy.stores.redis_client import SharedRedis
from proxy.web.auth_guard import AuthGuard
from proxy.web.http_guard import GuardStats
from proxy.web.metrics_share import MetricsShare

__all__ = ["REQUEST_ID"]

CONFIG = web.AppKey("config", ConfigStore)
HTTP = web.AppKey("http_session", aiohttp.ClientSession)  # webhooks, alerts
# The providers' HTTP/1.1 client (``proxy.providers.pool``): all provider traffic.
UPSTREAM_POOL = web.AppKey("upstream_pool", Pool)
SETTLER = web.AppKey("settler", Settler)  # type: ignore[type-abstract]
TASKS = web.AppKey("tasks", TaskGroup)
BILLING = web.AppKey("billing", Billing)  # absent when no database is configured
UPSTREAMS = web.AppKey("upstreams", Upstreams)  # breakers, in-flight counts
REDIS = web.AppKey("redis", SharedRedis)  # absent when no Redis is configured
LIMITER = web.AppKey("limiter", RateLimiter)  # in Redis, or per process without it
STAGES = web.AppKey("stages", tuple[Stage, ...])  # the registry's stages, opened for this app
RUNTIME = web.AppKey("runtime", Runtime)  # what the pipeline is handed with each request
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)  # in-flight requests, draining
METRICS = web.AppKey("metrics", Metrics)
METRICS_SHARE = web.AppKey("metrics_share", MetricsShare)  # several workers only
# The server section as the process started (deadlines, caps, trusted proxies).
SERVER = web.AppKey("server", ServerConfig)
GUARD_STATS = web.AppKey("guard_stats", GuardStats)  # connection-level refusals
AUTH_GUARD = web.AppKey("auth_guard", AuthGuard)  # failed-auth throttling
# The tenant event sink (proxy.web.events_setup): an EventLog with a database,
# NoEvents without; job workers publish to it.
EVENTS = web.AppKey("events", EventSink)  # type: ignore[type-abstract]
DELIVERER = web.AppKey("webhook_deliverer", Deliverer)  # with a database only
# The Files and Batch APIs (absent without a database): their stores and
# this worker's batch worker (its events go to EVENTS).
FILES = web.AppKey("files", FileStore)
BATCHES = web.AppKey("batches", BatchStore)
BATCH_WORKER = web.AppKey("batch_worker", BatchWorker)
