"""The Files API: ``/v1/files``, for batch input files (``purpose=batch``).

Every call acts for the caller's tenant only: another tenant's file id is a
404, as if it did not exist. An upload is read part by part up to
``batches.max_file_bytes`` (the general ``server.max_body_bytes`` is for
request bodies, not files) and checked line by line before it is stored: the
first bad line is refused with its number.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import orjson
from aiohttp import BodyPartReader, web

from proxy.core import batch_input
from proxy.core.errors import BodyTooLarge, InvalidRequest, NotFound, ServiceUnavailable
from proxy.core.principal import Principal
from proxy.pipeline.runtime import PRINCIPAL
from proxy.stores.files import FileStore
from proxy.stores.pgwait import DatabaseDown
from proxy.web.keys import CONFIG, FILES

log = logging.getLogger("tollway.batches")

PURPOSES = ("batch",)


def caller(request: web.Request) -> Principal:
    """The key's principal: files and batches belong to a tenant."""
    who = request.get(PRINCIPAL)
    if who is None:
        raise NotFound("The Files and Batch APIs need API keys (auth: keys) and a database.")
    return who


def unavailable(cause: DatabaseDown) -> ServiceUnavailable:
    log.warning("files/batches store unavailable: %s", cause)
    return ServiceUnavailable(
        "The file store is unreachable; please retry shortly.",
        code="database_unavailable",
        headers={"retry-after": "2"},
    )


def json(body: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _store(request: web.Request) -> FileStore:
    store = request.app.get(FILES)
    if store is None:
        raise NotFound("The Files and Batch APIs need API keys (auth: keys) and a database.")
    return store


async def upload(request: web.Request) -> web.Response:
    who = caller(request)
    store = _store(request)
    policy = request.app[CONFIG].current.config.batches
    if not request.content_type.startswith("multipart/"):
        raise InvalidRequest("Upload the file as multipart/form-data (fields: file, purpose).")
    purpose, filename, content = None, "", b""
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            continue
        if part.name == "purpose":
            purpose = (await part.text()).strip()
        elif part.name == "file":
            filename = part.filename or "upload.jsonl"
            content = await _read_capped(part, policy.max_file_bytes)
    if purpose not in PURPOSES:
        raise InvalidRequest("purpose must be 'batch'.", param="purpose")
    if not content:
        raise InvalidRequest("The file is missing or empty.", param="file")
    _, errors = batch_input.read(content, policy.max_lines)
    if errors:
        raise InvalidRequest(errors[0].message, param="file", code="invalid_file")
    try:
        stored = await store.create(
            who.tenant_id,
            purpose,
            filename[:255],
            content,
            timedelta(days=policy.file_retention_days),
        )
    except DatabaseDown as exc:
        raise unavailable(exc) from None
    return json(stored.as_openai())


async def _read_capped(part: BodyPartReader, cap: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(1 << 16):
        size += len(chunk)
        if size > cap:
            raise BodyTooLarge(f"The file exceeds the limit of {cap} bytes.", param="file")
        chunks.append(chunk)
    return b"".join(chunks)


async def list_files(request: web.Request) -> web.Response:
    who = caller(request)
    limit = _limit(request, 10_000, 10_000)
    try:
        found, more = await _store(request).page(
            who.tenant_id, request.query.get("purpose"), request.query.get("after"), limit
        )
    except DatabaseDown as exc:
        raise unavailable(exc) from None
    data = [f.as_openai() for f in found]
    return json(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": more,
        }
    )


def _limit(request: web.Request, default: int, most: int) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise InvalidRequest(f"limit must be an integer from 1 to {most}.", param="limit")
    return int(raw)


def limit_of(request: web.Request) -> int:
    """The ``limit`` query parameter of a batch list (OpenAI: 1-100, 20)."""
    return _limit(request, 20, 100)


async def get_file(request: web.Request) -> web.Response:
    who = caller(request)
    try:
        found = await _store(request).get(who.tenant_id, request.match_info["file_id"])
    except DatabaseDown as exc:
        raise unavailable(exc) from None
    if found is None:
        raise _missing(request.match_info["file_id"])
    return json(found.as_openai())


async def file_content(request: web.Request) -> web.Response:
    who = caller(request)
    try:
        content = await _store(request).content(who.tenant_id, request.match_info["file_id"])
    except DatabaseDown as exc:
        raise unavailable(exc) from None
    if content is None:
        raise _missing(request.match_info["file_id"])
    return web.Response(body=content, content_type="application/octet-stream")


async def delete_file(request: web.Request) -> web.Response:
    who = caller(request)
    file_id = request.match_info["file_id"]
    try:
        deleted = await _store(request).delete(who.tenant_id, file_id)
    except DatabaseDown as exc:
        raise unavailable(exc) from None
    if not deleted:
        raise _missing(file_id)
    return json({"id": file_id, "object": "file", "deleted": True})


def _missing(file_id: str) -> NotFound:
    return NotFound(f"No such File object: {file_id}", param="id")


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/files", upload)
    r.add_get("/v1/files", list_files)
    r.add_get("/v1/files/{file_id}", get_file)
    r.add_get("/v1/files/{file_id}/content", file_content)
    r.add_delete("/v1/files/{file_id}", delete_file)
