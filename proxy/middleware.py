"""Middlewares, in the order ``app.py`` lists them.

``request_id`` comes first so every response, errors included, carries an
``x-request-id``; ``errors`` renders every failure in OpenAI's shape.
"""

from __future__ import annotations

import logging
import re
import secrets

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy import redact
from proxy.errors import GatewayError, InvalidRequest, NotFound
from proxy.state import REQUEST_ID

log = logging.getLogger("tollway.errors")
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._:\-]")


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def sanitise_request_id(given: str | None) -> str:
    """The client's id with anything but ``[A-Za-z0-9._:-]`` dropped, at most
    128 characters (it goes into log lines and the ledger); else a new one."""
    clean = _UNSAFE_ID_CHARS.sub("", given or "")[:128]
    return clean or new_request_id()


@web.middleware
async def request_id(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = sanitise_request_id(request.headers.get("x-request-id"))
    request[REQUEST_ID] = rid
    resp = await handler(request)
    if not resp.prepared:
        resp.headers["x-request-id"] = rid
    return resp


def render(exc: GatewayError, request: web.Request) -> web.Response:
    headers = {**exc.headers, "x-request-id": request.get(REQUEST_ID, "")}
    # A provider's error may quote what it was sent; no key leaves in a body.
    body = redact.scrub_bytes(exc.body())
    return web.Response(
        status=exc.http_status, body=body, headers=headers, content_type="application/json"
    )


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        return render(exc, request)
    except web.HTTPException as exc:
        if exc.status == 404:
            err: GatewayError = NotFound(f"Unknown request URL: {request.method} {request.path}.")
        elif exc.status == 405:
            err = InvalidRequest(f"Method {request.method} is not allowed for {request.path}.")
            err.headers["Allow"] = exc.headers.get("Allow", "")
            return web.Response(
                status=405, body=err.body(), headers=err.headers, content_type="application/json"
            )
        else:
            raise
        return render(err, request)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        err = GatewayError("The server had an error while processing your request.")
        return render(err, request)
