"""In-flight requests, draining and graceful shutdown.

The front middleware (``proxy.web.middleware.front``) registers every
``/v1/`` request's handler task while it runs; the relay counts the SSE
streams open to clients. On SIGTERM ``shutdown``:

1. marks the instance draining: ``/readyz`` answers 503, and every response
   still sent on an open keep-alive connection carries ``Connection: close``;
2. closes the listening sockets (no new connections);
3. waits up to the grace period (``server.shutdown_grace_s``) for the
   in-flight requests, streams included, to finish on their own;
4. aborts what is left: a stream gets an OpenAI-shaped SSE error event
   (``server_shutting_down``) and a clean end, a request still waiting for
   its provider a 503; both still settle (the delivered part is billed);
5. cleans the app up, which flushes the usage ledger and returns leases.

A second SIGTERM skips what is left of the grace period.
"""

from __future__ import annotations

import logging

from aiohttp import web

from proxy.core.lifecycle import Lifecycle
from proxy.web.keys import LIFECYCLE

log = logging.getLogger("tollway.lifecycle")

__all__ = ["Lifecycle", "shutdown", "was_aborted"]


def was_aborted(request: web.Request) -> bool:
    """Whether a cancellation of this request's handler is the shutdown's."""
    lifecycle = request.app.get(LIFECYCLE)
    return lifecycle is not None and lifecycle.aborting


async def shutdown(runner: web.AppRunner, grace: float) -> None:
    """Steps 1-5 of the module docstring, for a started runner."""
    lifecycle = runner.app[LIFECYCLE]
    lifecycle.draining = True
    for site in list(runner.sites):
        await site.stop()
    log.info("draining: %d request(s) in flight, grace %gs", lifecycle.requests, grace)
    await lifecycle.drain(grace)
    await runner.cleanup()
