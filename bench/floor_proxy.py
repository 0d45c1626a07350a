"""Yardstick: the least an aiohttp pass-through proxy can do.

    python bench/floor_proxy.py LISTEN_PORT UPSTREAM_BASE     # e.g. http://127.0.0.1:9000

Reads the request body, forwards it on one shared ClientSession and streams
the upstream answer back chunk by chunk: no parsing, no auth, no counting,
no retries. Tollway's pass-through is measured against it in the same run
(bench/README.md), so it must keep doing exactly this much and no more.

With ``TOLLWAY_LOOP_LAG_MS`` set (as ``bench/run.py`` sets it for every
target when the lag probe is on) it also runs Tollway's event-loop lag probe
(``proxy/web/loop_lag.py``: the same timer, the same histogram) and serves it
on ``GET /metrics``, so the bare proxy's loop lag is read beside Tollway's in
the same run. Unset, it loads nothing of the gateway and serves no /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

# Hop-by-hop and client-only request headers; what aiohttp recomputes on the way back.
DROP_REQUEST = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "authorization",
        "accept-encoding",
    }
)
DROP_RESPONSE = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}
)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SESSION = web.AppKey("session", ClientSession)
UPSTREAM = web.AppKey("upstream", str)


def new_session() -> ClientSession:
    """One pooled session, no connection limit, bytes passed through undecoded."""
    return ClientSession(
        connector=TCPConnector(limit=0, ttl_dns_cache=300),
        timeout=ClientTimeout(total=None, sock_connect=10, sock_read=600),
        auto_decompress=False,
    )


async def proxy(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in DROP_REQUEST}
    url = request.app[UPSTREAM] + request.rel_url.path_qs
    session = request.app[SESSION]
    async with session.request(request.method, url, data=body, headers=headers) as up:
        kept = {k: v for k, v in up.headers.items() if k.lower() not in DROP_RESPONSE}
        resp = web.StreamResponse(status=up.status, headers=kept)
        if up.content_length is not None:
            resp.content_length = up.content_length
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
    return resp


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = new_session()
    yield
    await app[SESSION].close()


def install_uvloop() -> None:
    """The same event loop as Tollway's, so the comparison is like for like."""
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


def add_loop_lag(app: web.Application) -> None:
    """Tollway's lag probe and a /metrics route, when ``TOLLWAY_LOOP_LAG_MS`` asks."""
    if not os.environ.get("TOLLWAY_LOOP_LAG_MS", "").strip():
        return
    from aioprometheus import Registry

    from proxy.core.prometheus import text
    from proxy.web import loop_lag

    interval = loop_lag.interval_from_env()
    if interval is None:
        return
    registry = Registry()
    probe = loop_lag.LoopLag(registry, interval)

    async def probe_ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(probe.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def metrics(request: web.Request) -> web.Response:
        return text(registry)

    app.cleanup_ctx.append(probe_ctx)
    app.router.add_get("/metrics", metrics)


def serve(app: web.Application, port: int, handler: Handler = proxy) -> None:
    add_loop_lag(app)  # before the catch-all route, which would take /metrics
    app.router.add_route("*", "/{tail:.*}", handler)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=4096)


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    port, upstream = int(sys.argv[1]), sys.argv[2].rstrip("/")
    install_uvloop()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[UPSTREAM] = upstream
    app.cleanup_ctx.append(session_ctx)
    serve(app, port)


if __name__ == "__main__":
    main()
