"""Deny by default: one middleware decides who may reach every route.

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

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.core import redact
from proxy.core.errors import GatewayError, InvalidApiKey, NotFound
from proxy.core.record import UsageRecord
from proxy.pipeline.runtime import CLIENT_IP, PRINCIPAL, REQUEST_ID, Runtime
from proxy.web.keys import AUTH_GUARD, RUNTIME

OPEN = frozenset({"/healthz", "/readyz", "/metrics"})
# The pipeline's routes: a refused request there is settled like any other
# (the metrics and the access log count it), under its endpoint's name.
_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
_ENDPOINTS["/v1/embeddings"] = "embeddings"
_ENDPOINTS["/v1/moderations"] = "moderations"


@web.middleware
async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if path in OPEN:
        return await handler(request)
    if path == "/admin" or path.startswith("/admin/"):
        check_admin(request)
        return await handler(request)
    rt = request.app[RUNTIME]
    config = rt.config.current.config
    request[CLIENT_IP] = request.app[AUTH_GUARD].proxies.client(request)
    if config.auth == "keys":
        try:
            if rt.billing is None:  # refused at start; kept as a guard
                raise InvalidApiKey("API keys are required but no key store is configured.")
            guard = request.app[AUTH_GUARD]
            request[PRINCIPAL] = await guard.authenticate(
                request, rt.billing.auth, rt.limiter, config
            )
        except GatewayError as exc:
            _settle_refused(rt, request, exc)
            raise
    return await handler(request)


def check_admin(request: web.Request) -> None:
    expected = os.environ.get("TOLLWAY_ADMIN_KEY")
    if not expected:
        raise NotFound("The admin API is not enabled on this gateway.")
    redact.remember(expected)  # never in a log line, whatever logs it
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
        raise InvalidApiKey("Invalid admin key.")


def _settle_refused(rt: Runtime, request: web.Request, exc: GatewayError) -> None:
    endpoint = _ENDPOINTS.get(request.path)
    if endpoint is None:
        return
    record = UsageRecord(request[REQUEST_ID], endpoint, config=rt.config.current.config)
    record.fail(exc)
    rt.settler.settle(record)
