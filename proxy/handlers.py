"""HTTP handlers: thin adapters from routes to the pipeline and the catalog."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from proxy import pipeline
from proxy.config import ModelConfig
from proxy.errors import ModelNotFound
from proxy.state import CONFIG, LIFECYCLE


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await pipeline.handle(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await pipeline.handle(request, "completions")


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await pipeline.handle(request, "embeddings")


def _model_object(name: str, model: ModelConfig, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": model.owned_by}


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


async def list_models(request: web.Request) -> web.Response:
    snap = request.app[CONFIG].current
    created = int(snap.loaded_at)
    data = [_model_object(n, m, created) for n, m in snap.router.listed_models()]
    return _json({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    snap = request.app[CONFIG].current
    name = request.match_info["model"]
    model = snap.router.find(name)
    if model is None or not snap.router.is_available(model):
        raise ModelNotFound(f"The model '{name}' does not exist", param="model")
    return _json(_model_object(name, model, int(snap.loaded_at)))


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    snap = request.app[CONFIG].current
    if request.app[LIFECYCLE].draining:  # shutting down: load balancers, look elsewhere
        return _json({"status": "draining", "config_version": snap.config.version}, 503)
    return _json({"status": "ready", "config_version": snap.config.version})
