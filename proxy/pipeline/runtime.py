"""What the pipeline needs from the app, handed over once by the web layer.

The pipeline never reads ``request.app``: the web layer builds one
``Runtime`` when the app starts (after every store is open) and passes it to
``handle`` with each request.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from proxy.core.lifecycle import Lifecycle
from proxy.core.principal import Principal
from proxy.core.record import Settler
from proxy.core.trace import Span
from proxy.pipeline.snapshot import ConfigStore
from proxy.stages.admit.billing import Billing
from proxy.stages.forward.attempts import Upstreams
from proxy.stores.permits import PermitLeases
from proxy.stores.ratelimit import RateLimiter


@dataclass(frozen=True, slots=True)
class Runtime:
    config: ConfigStore  # the live snapshot, swapped by reloads
    upstreams: Upstreams  # breakers, in-flight counts, provider limits
    limiter: RateLimiter  # per-key windows (Redis, or per process)
    settler: Settler  # every settler, in order (proxy.web.settlers)
    lifecycle: Lifecycle  # streams open, shutdown in progress
    billing: Billing | None = None  # None without a database (auth: none)
    permits: PermitLeases | None = None  # leases of ``limiter``'s windows for key limits


# Drawn (or sanitised from the client's x-request-id) by the web layer's
# front middleware before the pipeline runs.
REQUEST_ID = web.RequestKey("request_id", str)
# The caller's principal, found by the web layer's gate (absent with ``auth: none``).
PRINCIPAL = web.RequestKey("principal", Principal)
# The client's address as the web layer's gate found it (trusted proxies honoured).
CLIENT_IP = web.RequestKey("client_ip", str)
# The request's root span, started by the web layer's gate around the key
# check (absent on a route the pipeline does not serve).
TRACE = web.RequestKey("trace", Span)  # type: ignore[type-abstract]
