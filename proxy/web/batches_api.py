"""The Batch API: ``/v1/batches``, run by Tollway's own workers.

Creating a batch checks its input file (which must be the caller's, with
``purpose=batch``) against the batch's endpoint synchronously: a file whose
lines do not fit makes a ``failed`` batch with one error per bad line, as at
OpenAI; otherwise the batch is ``in_progress`` with its lines queued in
Postgres for any worker (``proxy.pipeline.batch_worker``). Every call acts
for the caller's tenant only (another tenant's batch is a 404).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from aiohttp import web

from proxy.core import batch_input
from proxy.core.errors import Conflict, InvalidRequest, NotFound
from proxy.stages import parse
from proxy.web.keys import BATCH_WORKER, BATCHES, CONFIG, EVENTS, FILES
from proxy.web.tenant_api import caller, from_db, json, limit, page, store

WINDOWS = {"24h": timedelta(hours=24)}
MAX_METADATA = 16


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) > MAX_METADATA
        or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
            for k, v in value.items()
        )
    ):
        raise InvalidRequest(
            "metadata must map at most 16 keys (64 characters) to strings (512 characters).",
            param="metadata",
        )
    return value


async def create(request: web.Request) -> web.Response:
    who = caller(request)
    batches = store(request, BATCHES)
    config = request.app[CONFIG].current.config
    body = await parse.read_json(request, config.server.max_body_bytes)
    endpoint, window, file_id = _asked(body)
    metadata = _metadata(body.get("metadata"))
    content = await _input_file(request, who.tenant_id, file_id)
    lines, errors = batch_input.read(content, config.batches.max_lines)
    errors += _wrong_urls(lines, endpoint)
    batch = await from_db(
        batches.create(
            who.tenant_id,
            who.key_id,
            endpoint,
            file_id,
            WINDOWS[window],
            window,
            metadata,
            lines,
            [e.as_openai() for e in errors],
        )
    )
    await request.app[EVENTS].publish(who.tenant_id, f"batch.{batch['status']}", batch)
    _wake_worker(request)
    return json(batch)


def _asked(body: dict[str, Any]) -> tuple[str, str, str]:
    """The endpoint, completion window and input file id a batch needs."""
    endpoint = body.get("endpoint")
    if endpoint not in batch_input.ENDPOINTS:
        raise InvalidRequest(
            "endpoint must be one of " + ", ".join(batch_input.ENDPOINTS) + ".", param="endpoint"
        )
    window = body.get("completion_window")
    if window not in WINDOWS:
        raise InvalidRequest("completion_window must be '24h'.", param="completion_window")
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str) or not file_id:
        raise InvalidRequest("input_file_id is required.", param="input_file_id")
    return str(endpoint), str(window), file_id


async def _input_file(request: web.Request, tenant_id: int, file_id: str) -> bytes:
    """The input file's content: the tenant's own, uploaded for a batch."""
    files = request.app[FILES]
    found = await from_db(files.get(tenant_id, file_id))
    content = await from_db(files.content(tenant_id, file_id)) if found is not None else None
    if found is None or content is None:
        raise NotFound(f"No such File object: {file_id}", param="input_file_id")
    if found.purpose != "batch":
        raise InvalidRequest("The input file's purpose must be 'batch'.", param="input_file_id")
    return content


def _wrong_urls(lines: list[batch_input.InputLine], endpoint: str) -> list[batch_input.LineError]:
    """A line for another endpoint fails the batch, as at OpenAI."""
    return [
        batch_input.LineError(
            x.line,
            "invalid_url",
            f"Line {x.line}: url {x.url} does not match the batch's endpoint {endpoint}.",
            "url",
        )
        for x in lines
        if x.url != endpoint
    ][: batch_input.MAX_ERRORS]


async def get_batch(request: web.Request) -> web.Response:
    who = caller(request)
    batch_id = request.match_info["batch_id"]
    batch = await from_db(store(request, BATCHES).get(who.tenant_id, batch_id))
    if batch is None:
        raise NotFound(f"No such Batch object: {batch_id}", param="batch_id")
    return json(batch)


async def list_batches(request: web.Request) -> web.Response:
    who = caller(request)
    most = limit(request, 20, 100)  # OpenAI's default and most
    after = request.query.get("after")
    found, more = await from_db(store(request, BATCHES).page(who.tenant_id, after, most))
    return page(found, more)


async def cancel(request: web.Request) -> web.Response:
    who = caller(request)
    batch_id = request.match_info["batch_id"]
    batch = await from_db(store(request, BATCHES).cancel(who.tenant_id, batch_id))
    if batch is None:
        raise NotFound(f"No such Batch object: {batch_id}", param="batch_id")
    if batch["status"] not in ("cancelling", "cancelled"):
        raise Conflict(f"A batch that is {batch['status']} cannot be cancelled.")
    _wake_worker(request)
    return json(batch)


def _wake_worker(request: web.Request) -> None:
    """Lines queued or cancelled: the worker looks now, not at its next tick."""
    worker = request.app.get(BATCH_WORKER)
    if worker is not None:
        worker.wake()


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/batches", create)
    r.add_get("/v1/batches", list_batches)
    r.add_get("/v1/batches/{batch_id}", get_batch)
    r.add_post("/v1/batches/{batch_id}/cancel", cancel)
