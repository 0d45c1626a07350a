"""The Files API: ``/v1/files``, for batch input files (``purpose=batch``).

Every call acts for the caller's tenant only: another tenant's file id is a
404, as if it did not exist. An upload is read part by part up to
``batches.max_file_bytes`` (the general ``server.max_body_bytes`` is for
request bodies, not files) and checked line by line before it is stored: the
first bad line is refused with its number.
"""

from __future__ import annotations

from datetime import timedelta

from aiohttp import BodyPartReader, web

from proxy.core import batch_input
from proxy.core.errors import BodyTooLarge, InvalidRequest, NotFound
from proxy.web.keys import CONFIG, FILES
from proxy.web.tenant_api import caller, from_db, json, limit, page, store

PURPOSES = ("batch",)


async def upload(request: web.Request) -> web.Response:
    who = caller(request)
    files = store(request, FILES)
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
    retention = timedelta(days=policy.file_retention_days)
    stored = await from_db(files.create(who.tenant_id, purpose, filename[:255], content, retention))
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
    most = limit(request, 10_000, 10_000)
    purpose, after = request.query.get("purpose"), request.query.get("after")
    found, more = await from_db(store(request, FILES).page(who.tenant_id, purpose, after, most))
    return page([f.as_openai() for f in found], more)


async def get_file(request: web.Request) -> web.Response:
    who = caller(request)
    file_id = request.match_info["file_id"]
    found = await from_db(store(request, FILES).get(who.tenant_id, file_id))
    if found is None:
        raise _missing(file_id)
    return json(found.as_openai())


async def file_content(request: web.Request) -> web.Response:
    who = caller(request)
    file_id = request.match_info["file_id"]
    content = await from_db(store(request, FILES).content(who.tenant_id, file_id))
    if content is None:
        raise _missing(file_id)
    return web.Response(body=content, content_type="application/octet-stream")


async def delete_file(request: web.Request) -> web.Response:
    who = caller(request)
    file_id = request.match_info["file_id"]
    if not await from_db(store(request, FILES).delete(who.tenant_id, file_id)):
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
