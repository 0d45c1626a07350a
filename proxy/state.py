"""Typed app state: every shared object lives here, never in a module global."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from proxy.billing import Billing
from proxy.cache import ResponseCache
from proxy.config import ServerConfig
from proxy.forward import Upstreams
from proxy.http_guard import GuardStats
from proxy.ratelimit import RateLimiter, Verdict
from proxy.redis_client import SharedRedis
from proxy.settle import Settler
from proxy.snapshot import ConfigStore
from proxy.tasks import TaskGroup

if TYPE_CHECKING:
    from proxy.auth_guard import AuthGuard
    from proxy.lifecycle import Lifecycle
    from proxy.metrics import Metrics
    from proxy.metrics_share import MetricsShare
    from proxy.reload import Reloader

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
# The server section as the process started (deadlines, caps, trusted proxies).
SERVER = web.AppKey("server", ServerConfig)
GUARD_STATS = web.AppKey("guard_stats", GuardStats)  # connection-level refusals
AUTH_GUARD: web.AppKey[AuthGuard] = web.AppKey("auth_guard")  # failed-auth throttling

# Per-request values.
REQUEST_ID = web.RequestKey("request_id", str)
RATE = web.RequestKey("rate", Verdict)  # the key's rate-limit windows, once admitted
