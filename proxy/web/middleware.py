"""The one middleware of the app (``front``).

It gives the request its id, so every response, errors included, carries
an ``x-request-id``; registers ``/v1/`` requests as in flight for the drain
(``proxy.web.lifecycle``); runs the gate (``proxy.web.gate``: deny by
default); and renders every failure, the 503 of a request aborted at
shutdown included, in OpenAI's shape (``render``, which the pipeline's
handlers also call, to send a refusal before the request settles).
These were three middlewares; merged because each layer costs every
request a call and a coroutine.
"""

from __future__ import annotations

import asyncio
import logging
import re
from random import getrandbits

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.core import redact
from proxy.core.errors import GatewayError, InvalidRequest, NotFound
from proxy.core.lifecycle import shutting_down
from proxy.doors.registry import door_for
from proxy.pipeline.runtime import REQUEST_ID
from proxy.web import gate
from proxy.web.keys import LIFECYCLE

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
async def front(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The only middleware: the request id, the in-flight register for the
    drain, the gate (deny by default), and OpenAI-shaped errors for all that
    can raise. One layer, because aiohttp charges every request a call and a
    coroutine per middleware; the order inside is what three layers had."""
    rid = request[REQUEST_ID] = sanitise_request_id(request.headers.get("x-request-id"))
    lifecycle = request.app[LIFECYCLE]
    # Registered before the gate: a request waiting on the key store is in
    # flight for the drain.
    task = asyncio.current_task() if request.path.startswith("/v1/") else None
    if task is not None:
        lifecycle.enter(task)
    try:
        checking = gate.admit(request)
        if checking is not None:
            await checking
        resp = await handler(request)
    except asyncio.CancelledError:
        if task is None or not lifecycle.aborting:
            raise
        task.uncancel()  # the shutdown's cancel, answered with a 503
        return render(shutting_down(), request)
    except GatewayError as exc:
        return render(exc, request)
    except web.HTTPException as exc:
        resp = _http_error(exc, request)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        err = GatewayError("The server had an error while processing your request.")
        return render(err, request)
    finally:
        if task is not None:
            lifecycle.leave(task)
    if not resp.prepared:
        if lifecycle.draining:
            resp.force_close()  # keep-alive clients move to another instance
        resp.headers["x-request-id"] = rid
    return resp


def render(exc: GatewayError, request: web.Request) -> web.Response:
    headers = {**exc.headers, "x-request-id": request.get(REQUEST_ID, "")}
    door = door_for(request.path)
    status, body = (exc.http_status, exc.body()) if door is None else door.error(exc)
    # A provider's error may quote what it was sent; no key leaves in a body.
    return web.Response(
        status=status,
        body=redact.scrub_bytes(body),
        headers=headers,
        content_type="application/json",
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
