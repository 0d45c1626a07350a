"""The front middleware, first in ``app.py``'s list.

``envelope`` does two jobs that must both wrap everything else, merged into
one middleware because each layer costs every request a call: it gives the
request its id, so every response, errors included, carries an
``x-request-id``; and it renders every failure in OpenAI's shape.
"""

from __future__ import annotations

import logging
import re
from random import getrandbits

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.core import redact
from proxy.core.errors import GatewayError, InvalidRequest, NotFound
from proxy.pipeline.runtime import REQUEST_ID

log = logging.getLogger("tollway.errors")
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._:\-]")


def new_request_id() -> str:
    # An id, not a secret: 96 bits of the process's PRNG (reseeded after a
    # fork) avoid a urandom syscall per request. The ledger's idempotency
    # key is drawn separately.
    return f"req_{getrandbits(96):024x}"


def sanitise_request_id(given: str | None) -> str:
    """The client's id with anything but ``[A-Za-z0-9._:-]`` dropped, at most
    128 characters (it goes into log lines and the ledger); else a new one."""
    if not given:
        return new_request_id()
    clean = _UNSAFE_ID_CHARS.sub("", given)[:128]
    return clean or new_request_id()


@web.middleware
async def envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = request[REQUEST_ID] = sanitise_request_id(request.headers.get("x-request-id"))
    try:
        resp = await handler(request)
    except GatewayError as exc:
        return render(exc, request)
    except web.HTTPException as exc:
        resp = _http_error(exc, request)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        err = GatewayError("The server had an error while processing your request.")
        return render(err, request)
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


def _http_error(exc: web.HTTPException, request: web.Request) -> web.Response:
    """aiohttp's own 404 and 405 in OpenAI's shape; any other is raised again."""
    if exc.status == 404:
        return render(NotFound(f"Unknown request URL: {request.method} {request.path}."), request)
    if exc.status == 405:
        err = InvalidRequest(f"Method {request.method} is not allowed for {request.path}.")
        err.headers["Allow"] = exc.headers.get("Allow", "")
        return web.Response(
            status=405, body=err.body(), headers=err.headers, content_type="application/json"
        )
    raise exc
