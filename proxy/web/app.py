"""The only module that wires things together: state, middlewares, routes."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.config.model import Config
from proxy.core import redact, tokens
from proxy.core.lifecycle import Lifecycle
from proxy.core.record import LogSettler, Settler
from proxy.core.tasks import TaskGroup
from proxy.doors.registry import DOORS
from proxy.pipeline import registry
from proxy.pipeline.embed import InternalEmbedder
from proxy.pipeline.moderate import InternalModerator
from proxy.pipeline.runtime import Runtime
from proxy.pipeline.snapshot import ConfigStore, build_snapshot
from proxy.providers.pool import Pool
from proxy.stages.base import Services, Stage
from proxy.stages.forward.attempts import Upstreams
from proxy.stages.settle.access_log import AccessLog
from proxy.stages.settle.budget_alerts import BudgetAlertsStage
from proxy.stages.settle.line_writer import LineWriter
from proxy.stages.settle.metrics import Metrics
from proxy.stages.settle.settlers import Settlers
from proxy.stores.permits import PermitLeases
from proxy.stores.redis_client import RedisOptions
from proxy.web import (
    admin,
    admin_webhooks,
    batches_api,
    events_stream,
    files_api,
    handlers,
    middleware,
    observe,
    reload,
    responses_api,
    usage_api,
)
from proxy.web.auth_guard import AuthGuard
from proxy.web.batches_setup import BatchRole, batches_ctx
from proxy.web.billing_setup import BillingOptions, billing_ctx
from proxy.web.events_setup import end_streams, events_ctx
from proxy.web.http_guard import GuardStats
from proxy.web.keys import (
    AUTH_GUARD,
    BILLING,
    CONFIG,
    EVENTS,
    GUARD_STATS,
    HTTP,
    LIFECYCLE,
    LIMITER,
    METRICS,
    REDIS,
    RUNTIME,
    SERVER,
    SETTLER,
    STAGES,
    TASKS,
    UPSTREAM_POOL,
    UPSTREAMS,
)
from proxy.web.loop_lag import loop_lag_ctx
from proxy.web.redis_setup import redis_ctx

MIDDLEWARES = [middleware.front]  # request id, drain register, gate, error shape


def build_app(
    config: Config,
    *,
    settler: Settler | None = None,
    billing: BillingOptions | None = None,
    redis: RedisOptions | None = None,
    reloading: reload.ReloadOptions | None = None,
    metrics_dir: Path | None = None,
    stages: Sequence[Stage] | None = None,
    access_fd: int | None = None,
    batch_role: BatchRole = "inline",
) -> web.Application:
    """``billing`` (a database) is required for ``auth: keys``; without it
    requests are settled to ``settler`` (the log by default). Without
    ``redis`` rate limits are per process and the response cache is off.
    ``reloading`` names the file to watch and reload; ``metrics_dir`` is
    where the workers of one instance share their metrics; ``access_fd``
    where the access lines are written in batches (else the logger).
    ``stages`` replaces the registry's (tests of the plugin model).
    ``batch_role``: whether this process runs batch lines (``batches_setup``)."""
    redact.install()
    if config.auth == "keys" and billing is None:
        raise ValueError("auth: keys needs a database (billing options)")
    app = web.Application(middlewares=MIDDLEWARES, client_max_size=config.server.max_body_bytes + 1)
    _add_state(app, config, stages)
    _add_lifetimes(
        app,
        config,
        settler=settler,
        billing=billing,
        redis=redis,
        reloading=reloading,
        metrics_dir=metrics_dir,
        access_fd=access_fd,
        batch_role=batch_role,
    )
    if _counts_soon(config):
        app.on_startup.append(_warm_tokens)
    _routes(app)
    return app


def _add_state(app: web.Application, config: Config, stages: Sequence[Stage] | None) -> None:
    """What lives as long as the app and needs nothing opened: the stages,
    breakers, drain, metrics and the server's own guards."""
    app[STAGES] = tuple(stages) if stages is not None else registry.build_stages()
    app[UPSTREAMS] = Upstreams()  # breaker state per process until Redis is wired in
    app[LIFECYCLE] = Lifecycle()
    app[METRICS] = Metrics()
    app[SERVER] = config.server
    app[GUARD_STATS] = GuardStats()
    app[AUTH_GUARD] = AuthGuard(config.server.trusted_proxies)


def _add_lifetimes(
    app: web.Application,
    config: Config,
    *,
    settler: Settler | None,
    billing: BillingOptions | None,
    redis: RedisOptions | None,
    reloading: reload.ReloadOptions | None,
    metrics_dir: Path | None,
    access_fd: int | None,
    batch_role: BatchRole,
) -> None:
    """What is opened at start and closed at shutdown, in the one order that
    works: cleanup_ctx runs in order at start and in reverse at shutdown, so
    billing closes (final flush, leases returned) after in-flight tasks drained."""
    app.cleanup_ctx.append(_http_session)
    app.cleanup_ctx.append(_upstream_pool)
    app.cleanup_ctx.append(_config_store(config))
    app.cleanup_ctx.append(redis_ctx(redis))  # closes after the tasks that write to it
    app.cleanup_ctx.append(_tasks)
    app.cleanup_ctx.append(loop_lag_ctx)  # off unless TOLLWAY_LOOP_LAG_MS is set
    if billing is not None:
        app.cleanup_ctx.append(billing_ctx(billing))
    app.cleanup_ctx.append(responses_api.services_ctx)  # after billing: its pool
    app.cleanup_ctx.append(_settlers(settler, access_fd))  # after billing, its first settler
    # The tenant event log (app[EVENTS], the job workers' sink): after the
    # tasks, the HTTP session and billing (which checked the migrations).
    app.cleanup_ctx.append(events_ctx(billing.database_url if billing is not None else None))
    app.on_shutdown.append(end_streams)  # open event streams close with 1001
    # After Redis, the tasks and the settlers they use (the semantic cache's
    # embedding calls are settled); closed before billing and the tasks.
    app.cleanup_ctx.append(_stages(_stage_database(billing)))
    app.cleanup_ctx.append(observe.observe_ctx(metrics_dir))
    # The reloader needs to know whether a database is there.
    app.cleanup_ctx.append(reload.reload_ctx(reloading or reload.ReloadOptions(None)))
    app.cleanup_ctx.append(_runtime)  # everything the pipeline is handed exists
    # After the runtime its lines run on and the event log it publishes to;
    # stopped (lines finished or given back) before billing flushes their usage.
    app.cleanup_ctx.append(batches_ctx(batch_role))


def _routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/chat/completions", handlers.chat_completions)
    r.add_post("/v1/completions", handlers.completions)
    r.add_post("/v1/embeddings", handlers.embeddings)
    r.add_post("/v1/moderations", handlers.moderations)
    for door in DOORS:
        r.add_post(door.path, handlers.front_door(door))
    r.add_post("/v1/messages/count_tokens", handlers.count_message_tokens)
    r.add_get("/v1/responses/{id}", responses_api.get_response)
    r.add_delete("/v1/responses/{id}", responses_api.delete_response)
    r.add_get("/v1/models", handlers.list_models)
    r.add_get("/v1/models/{model:.+}", handlers.get_model)
    r.add_get("/v1/usage", usage_api.usage)
    r.add_get("/v1/events", events_stream.stream)  # a WebSocket
    r.add_get("/healthz", handlers.healthz)
    r.add_get("/readyz", handlers.readyz)
    r.add_get("/metrics", observe.metrics_handler)
    r.add_get("/admin/config", admin.guard(reload.get_config, needs_db=False))
    r.add_post("/admin/reload", admin.guard(reload.post_reload, needs_db=False))
    admin.add_routes(app)
    admin_webhooks.add_routes(app)
    files_api.add_routes(app)
    batches_api.add_routes(app)


def _counts_soon(config: Config) -> bool:
    """Whether tiktoken's table (~39 MB resident per worker) is loaded at
    start. Billing's journal (``auth: keys``) counts every stream that runs
    past its first checkpoint, and Gemini embeddings (and the echo provider)
    count on the event loop: for them, at start, in a thread. Otherwise
    nothing counts unless a provider leaves out usage, and that count runs
    in a thread, which then loads it (~0.3 s, once)."""
    return config.auth == "keys" or any(
        p.kind in ("gemini", "echo") for p in config.providers.values()
    )


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


async def _upstream_pool(app: web.Application) -> AsyncIterator[None]:
    # The providers' own client: keep-alive connections per origin, no limit.
    pool = Pool(keepalive=30)
    app[UPSTREAM_POOL] = pool
    yield
    await pool.close()


def _config_store(config: Config) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        stages = app[STAGES]
        app[CONFIG] = ConfigStore(build_snapshot(config, app[UPSTREAM_POOL], stages), stages)
        yield

    return ctx


def _stage_database(billing: BillingOptions | None) -> str | None:
    """The semantic cache's Postgres: its own, or the billing database."""
    own = os.environ.get("SEMANTIC_CACHE_DATABASE_URL")
    return own or (billing.database_url if billing is not None else None)


def _live_settings(app: web.Application) -> Callable[[str], object | None]:
    def settings(section: str) -> object | None:
        return app[CONFIG].current.config.section(section)

    return settings


def _stages(database_url: str | None) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        embedder = InternalEmbedder(app[CONFIG], app[UPSTREAMS], app[SETTLER])
        moderator = InternalModerator(app[CONFIG], app[UPSTREAMS], app[SETTLER])
        services = Services(
            app[HTTP],
            app[TASKS],
            app.get(REDIS),
            database_url,
            embedder,
            _live_settings(app),
            moderator,
            app[EVENTS],
        )
        for stage in app[STAGES]:
            await stage.open(services)
        yield
        for stage in app[STAGES][::-1]:
            await stage.close()

    return ctx


def _settlers(
    extra: Settler | None, access_fd: int | None
) -> Callable[[web.Application], AsyncIterator[None]]:
    """The one tuple of settlers: billing (the ledger), a caller's own (tests),
    then the observers. Without either of the first two, the debug log."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        first = [s for s in (app.get(BILLING), extra) if s is not None] or [LogSettler()]
        writer = LineWriter(access_fd) if access_fd is not None else None
        app[SETTLER] = Settlers((*first, app[METRICS], AccessLog(writer)))
        yield
        if writer is not None:
            writer.close()  # what is left now; a later line goes out at once

    return ctx


def _budget_alerts(app: web.Application) -> None:
    """The ledger's budget crossings go to the alerts stage (log, metric, webhook)."""
    billing = app.get(BILLING)
    stage = next((s for s in app[STAGES] if isinstance(s, BudgetAlertsStage)), None)
    if billing is None or stage is None:
        return
    billing.ledger.on_alerts = lambda crossings: stage.notify(
        crossings,
        app[CONFIG].current.config.section(BudgetAlertsStage.name),
        billing.auth.pool,
        app[METRICS].budget_alert,
    )


async def _runtime(app: web.Application) -> AsyncIterator[None]:
    _budget_alerts(app)
    permits = PermitLeases(app[LIMITER])
    app[RUNTIME] = Runtime(
        app[CONFIG],
        app[UPSTREAMS],
        app[LIMITER],
        app[SETTLER],
        app[LIFECYCLE],
        app.get(BILLING),
        permits,
    )
    yield
    await permits.settle_top_ups()  # before Redis is closed
