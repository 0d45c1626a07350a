"""Deny by default: one check, run by the front middleware, decides who may reach every route.

Open without a key, and why:

- ``/healthz`` and ``/readyz``: load balancers and orchestrators probe them
  with no credentials; they tell whether this process can serve, nothing
  about any tenant.
- ``/metrics``: Prometheus scrapes without credentials; it holds fleet-wide
  counters (by model, provider, status), never a key, prompt or tenant name.
  Keep it off the public network (the shipped nginx config does).

``/admin/...`` needs the admin key (``TOLLWAY_ADMIN_KEY``; without it the
admin API is off and answers 404). Every other path, known or not, needs an
API key when ``auth: keys``: an unknown path without a valid key gets the
same 401 as a known one, so routes cannot be probed. The principal found is
kept on the request for the pipeline and the handlers.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable

from aiohttp import web

from proxy.config.model import Config
from proxy.core import redact
from proxy.core.errors import GatewayError, InvalidApiKey, NotFound
from proxy.core.record import UsageRecord
from proxy.core.trace import NO_SPAN, NoSpan, Span
from proxy.doors.registry import DOORS
from proxy.pipeline.runtime import CLIENT_IP, PRINCIPAL, REQUEST_ID, TRACE, Runtime
from proxy.web.keys import AUTH_GUARD, RUNTIME

OPEN = frozenset({"/healthz", "/readyz", "/metrics"})
# The pipeline's routes: a refused request there is settled like any other
# (the metrics and the access log count it), under its endpoint's name.
_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
_ENDPOINTS["/v1/embeddings"] = "embeddings"
_ENDPOINTS["/v1/moderations"] = "moderations"
_ENDPOINTS.update((door.path, door.name) for door in DOORS)


def admit(request: web.Request) -> Awaitable[None] | None:
    """Let the request through or raise; the key check, when this path
    needs one, is returned to be awaited (None: nothing to wait for, which
    spares ``auth: none`` a coroutine per request). Called by the one front
    middleware (``proxy.web.middleware.front``) before any handler."""
    path = request.path
    if path in OPEN:
        return None
    if path == "/admin" or path.startswith("/admin/"):
        check_admin(request)
        return None
    app = request.app
    rt, guard = app[RUNTIME], app[AUTH_GUARD]
    snapshot = rt.config.current
    config = snapshot.config
    request[CLIENT_IP] = guard.proxies.client(request)
    endpoint = _ENDPOINTS.get(path)
    # The trace starts here so that it holds the key check: a pipeline
    # request's root span (the no-op one unless ``tracing:`` is on).
    trace = NO_SPAN if endpoint is None else snapshot.tracer.request(endpoint, request.headers)
    request[TRACE] = trace
    if config.auth == "keys":
        if rt.billing is not None and isinstance(trace, NoSpan):
            # A key the cache knows needs no coroutine; anything else (a
            # lookup, a refusal, a throttled address) goes the awaited way,
            # as does a traced request (its one "auth" span holds the check).
            who = guard.cached(request, rt.billing.auth)
            if who is not None:
                request[PRINCIPAL] = who
                return None
        return _authenticate(request, rt, config, trace)
    return None


async def _authenticate(request: web.Request, rt: Runtime, config: Config, trace: Span) -> None:
    try:
        with trace.child("auth"):
            if rt.billing is None:  # refused at start; kept as a guard
                raise InvalidApiKey("API keys are required but no key store is configured.")
            guard = request.app[AUTH_GUARD]
            request[PRINCIPAL] = await guard.authenticate(
                request, rt.billing.auth, rt.limiter, config
            )
    except GatewayError as exc:
        _settle_refused(rt, request, exc, trace)
        raise


def check_admin(request: web.Request) -> None:
    expected = os.environ.get("TOLLWAY_ADMIN_KEY")
    if not expected:
        raise NotFound("The admin API is not enabled on this gateway.")
    redact.remember(expected)  # never in a log line, whatever logs it
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
        raise InvalidApiKey("Invalid admin key.")


def _settle_refused(rt: Runtime, request: web.Request, exc: GatewayError, trace: Span) -> None:
    endpoint = _ENDPOINTS.get(request.path)
    if endpoint is None:
        return
    record = UsageRecord(request[REQUEST_ID], endpoint, config=rt.config.current.config)
    record.fail(exc)
    record.trace_id = trace.trace_id
    trace.stamp(exc.headers)
    trace.finish(record)
    rt.settler.settle(record)
