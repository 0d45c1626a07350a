"""HTTP handlers: thin adapters from routes to the pipeline and the catalog.

The pipeline's handlers pass the ``front`` middleware's ``render``: a
refusal is sent in OpenAI's shape before the request settles, as an
answer is, instead of after it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from proxy.config.model import Config, ModelConfig
from proxy.core.errors import ModelNotFound
from proxy.core.metering import off_loop
from proxy.doors import messages_request
from proxy.doors.base import FrontDoor
from proxy.pipeline import run as pipeline
from proxy.pipeline.runtime import PRINCIPAL
from proxy.stages import parse
from proxy.stages.admit.billing import tier_of
from proxy.web.keys import BILLING, CONFIG, LIFECYCLE, REDIS, RUNTIME
from proxy.web.middleware import render
from proxy.web.responses_api import DOOR_SERVICES

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await pipeline.handle(request, "chat", request.app[RUNTIME], refuse=render)


async def completions(request: web.Request) -> web.StreamResponse:
    return await pipeline.handle(request, "completions", request.app[RUNTIME], refuse=render)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await pipeline.handle(request, "embeddings", request.app[RUNTIME], refuse=render)


async def moderations(request: web.Request) -> web.StreamResponse:
    return await pipeline.handle(request, "moderations", request.app[RUNTIME], refuse=render)


def front_door(door: type[FrontDoor]) -> Handler:
    """A front door's route: the chat pipeline, translated at its edges."""

    async def handler(request: web.Request) -> web.StreamResponse:
        services = request.app.get(DOOR_SERVICES)
        return await pipeline.handle(
            request, "chat", request.app[RUNTIME], lambda rid: door(rid, services), render
        )

    return handler


async def count_message_tokens(request: web.Request) -> web.Response:
    """Anthropic's ``/v1/messages/count_tokens``: counted here, nothing
    forwarded or billed (the key check still applies, as on every route).
    The model is routed as the same Messages request would be, so a name
    that does not exist, or that the caller's tier may not use, gets the
    error ``create`` would give, not a count."""
    snap = request.app[RUNTIME].config.current
    body = await parse.read_json(request, snap.config.server.max_body_bytes)
    model = body.get("model")
    if isinstance(model, str) and model:  # else count_tokens says what is missing
        who = request.get(PRINCIPAL)
        snap.router.plan(
            model,
            request.headers,
            tenant=who.tenant if who else None,
            tier=who.tier if who else None,
            access=None if who is None else tier_of(snap.config, who),
        )
    counted = await off_loop(messages_request.count_tokens, body)
    return _json(counted)


def _model_object(name: str, model: ModelConfig, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": model.owned_by}


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _may_use(request: web.Request, config: Config) -> Callable[[str], bool]:
    """Which model names the caller's tier allows (all of them with ``auth: none``)."""
    who = request.get(PRINCIPAL)
    if who is None:
        return lambda name: True
    tier = config.tiers.get(who.tier)
    return tier.allows if tier is not None else (lambda name: False)


async def list_models(request: web.Request) -> web.Response:
    snap = request.app[CONFIG].current
    created = int(snap.loaded_at)
    allowed = _may_use(request, snap.config)
    listed = snap.router.listed_models()
    data = [_model_object(n, m, created) for n, m in listed if allowed(n)]
    return _json({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    """A model the caller's tier may not use does not exist for it (as OpenAI does)."""
    snap = request.app[CONFIG].current
    name = request.match_info["model"]
    model = snap.router.find(name)
    if (
        model is None
        or not snap.router.is_available(model)
        or not _may_use(request, snap.config)(name)
    ):
        raise ModelNotFound(f"The model '{name}' does not exist", param="model")
    return _json(_model_object(name, model, int(snap.loaded_at)))


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: config loaded, not draining, Postgres answering. Redis is only
    reported: without it requests still pass (per-process limits, no cache)."""
    app = request.app
    body: dict[str, Any] = {"status": "ready", "config_version": app[CONFIG].current.config.version}
    redis = app.get(REDIS)
    body["redis"] = "off" if redis is None else ("up" if redis.up else "down")
    billing = app.get(BILLING)
    if billing is not None:
        body["database"] = "up" if await billing.ledger.reachable() else "unreachable"
    if app[LIFECYCLE].draining:  # shutting down: load balancers, look elsewhere
        body["status"] = "draining"
    elif body.get("database") == "unreachable":
        body["status"] = "unready"  # keys and quotas cannot be checked
    return _json(body, 200 if body["status"] == "ready" else 503)
