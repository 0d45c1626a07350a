"""The only module that wires things together: state, middlewares, routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy import admin, handlers, lifecycle, middleware, observe, redact, reload, tokens, usage_api
from proxy.billing_setup import BillingOptions, billing_ctx
from proxy.config import Config
from proxy.forward import Upstreams
from proxy.lifecycle import Lifecycle
from proxy.loop_lag import loop_lag_ctx
from proxy.metrics import Metrics
from proxy.redis_client import RedisOptions
from proxy.redis_setup import redis_ctx
from proxy.settle import LogSettler, Settler
from proxy.snapshot import ConfigStore, build_snapshot
from proxy.state import CONFIG, HTTP, LIFECYCLE, METRICS, SETTLER, TASKS, UPSTREAMS
from proxy.tasks import TaskGroup

# Order matters: envelope (the request id, then error rendering) comes first,
# so the id exists before an error is rendered and the renderer wraps
# everything that can raise, including the 503 that lifecycle.track answers
# for a request aborted at shutdown.
MIDDLEWARES = [middleware.envelope, lifecycle.track]


def build_app(
    config: Config,
    *,
    settler: Settler | None = None,
    billing: BillingOptions | None = None,
    redis: RedisOptions | None = None,
    reloading: reload.ReloadOptions | None = None,
    metrics_dir: Path | None = None,
) -> web.Application:
    """``billing`` (a database) is required for ``auth: keys``; without it
    requests are settled to ``settler`` (the log by default). Without
    ``redis`` rate limits are per process and the response cache is off.
    ``reloading`` names the file to watch and reload; ``metrics_dir`` is
    where the workers of one instance share their metrics."""
    redact.install()
    if config.auth == "keys" and billing is None:
        raise ValueError("auth: keys needs a database (billing options)")
    app = web.Application(middlewares=MIDDLEWARES, client_max_size=config.server.max_body_bytes + 1)
    app[SETTLER] = settler or LogSettler()
    app[UPSTREAMS] = Upstreams()  # breaker state per process until Redis is wired in
    app[LIFECYCLE] = Lifecycle()
    app[METRICS] = Metrics()
    # cleanup_ctx runs in order at start and in reverse at shutdown: billing
    # closes (final flush, leases returned) after in-flight tasks drained.
    app.cleanup_ctx.append(_http_session)
    app.cleanup_ctx.append(_config_store(config))
    app.cleanup_ctx.append(redis_ctx(redis))  # closes after the tasks that write to it
    app.cleanup_ctx.append(_tasks)
    app.cleanup_ctx.append(loop_lag_ctx)  # off unless TOLLWAY_LOOP_LAG_MS is set
    if billing is not None:
        app.cleanup_ctx.append(billing_ctx(billing))
    # After billing: the observers wrap its settler; the reloader needs to
    # know whether a database is there.
    app.cleanup_ctx.append(observe.observe_ctx(metrics_dir))
    app.cleanup_ctx.append(reload.reload_ctx(reloading or reload.ReloadOptions(None)))
    app.on_startup.append(_warm_tokens)
    _routes(app)
    return app


def _routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/chat/completions", handlers.chat_completions)
    r.add_post("/v1/completions", handlers.completions)
    r.add_post("/v1/embeddings", handlers.embeddings)
    r.add_get("/v1/models", handlers.list_models)
    r.add_get("/v1/models/{model:.+}", handlers.get_model)
    r.add_get("/v1/usage", usage_api.usage)
    r.add_get("/healthz", handlers.healthz)
    r.add_get("/readyz", handlers.readyz)
    r.add_get("/metrics", observe.metrics_handler)
    r.add_get("/admin/config", admin.guard(reload.get_config, needs_db=False))
    r.add_post("/admin/reload", admin.guard(reload.post_reload, needs_db=False))
    admin.add_routes(app)


async def _warm_tokens(app: web.Application) -> None:
    await asyncio.get_running_loop().run_in_executor(None, tokens.warm_up)


async def _tasks(app: web.Application) -> AsyncIterator[None]:
    app[TASKS] = TaskGroup()
    yield
    await app[TASKS].drain(grace=10)


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    # One pooled session for all providers; no per-request sessions.
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
    async with aiohttp.ClientSession(
        connector=connector, auto_decompress=True, skip_auto_headers=("User-Agent",)
    ) as session:
        app[HTTP] = session
        yield


def _config_store(config: Config) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        app[CONFIG] = ConfigStore(build_snapshot(config, app[HTTP]))
        yield

    return ctx
