"""Typed app state: every shared object lives here, never in a module global."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from proxy.core.record import Settler
from proxy.core.tasks import TaskGroup
from proxy.pipeline.snapshot import ConfigStore
from proxy.stages.admit.billing import Billing
from proxy.stages.cache.store import ResponseCache
from proxy.stages.forward.attempts import Upstreams
from proxy.stores.ratelimit import RateLimiter, Verdict
from proxy.stores.redis_client import SharedRedis

if TYPE_CHECKING:
    from proxy.stages.settle.metrics import Metrics
    from proxy.web.lifecycle import Lifecycle
    from proxy.web.metrics_share import MetricsShare
    from proxy.web.reload import Reloader

CONFIG = web.AppKey("config", ConfigStore)
HTTP = web.AppKey("http_session", aiohttp.ClientSession)
SETTLER = web.AppKey("settler", Settler)  # type: ignore[type-abstract]
TASKS = web.AppKey("tasks", TaskGroup)
BILLING = web.AppKey("billing", Billing)  # absent when no database is configured
UPSTREAMS = web.AppKey("upstreams", Upstreams)  # breakers, in-flight counts
REDIS = web.AppKey("redis", SharedRedis)  # absent when no Redis is configured
LIMITER = web.AppKey("limiter", RateLimiter)  # in Redis, or per process without it
CACHE = web.AppKey("cache", ResponseCache)
# Operations (issue 7); typed through TYPE_CHECKING imports, as those modules read this one.
LIFECYCLE: web.AppKey[Lifecycle] = web.AppKey("lifecycle")  # in-flight requests, draining
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
METRICS_SHARE: web.AppKey[MetricsShare] = web.AppKey("metrics_share")  # several workers only
RELOADER: web.AppKey[Reloader] = web.AppKey("reloader")

# Per-request values.
REQUEST_ID = web.RequestKey("request_id", str)
RATE = web.RequestKey("rate", Verdict)  # the key's rate-limit windows, once admitted
