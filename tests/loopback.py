"""The one step every fake server shares: an aiohttp app on 127.0.0.1, on
a port the kernel picks (tests only ever listen on loopback)."""

from __future__ import annotations

from aiohttp import web

SHUTDOWN_S = 5.0


async def serve_app(
    app: web.Application, *, handler_cancellation: bool = False
) -> tuple[web.AppRunner, str]:
    """``app`` listening: its runner (the caller cleans it up) and its base
    URL, ``http://127.0.0.1:<port>``. ``handler_cancellation``: a client
    that goes away cancels its handler, for fakes that record that.

    Cleanup waits at most ``SHUTDOWN_S`` for handlers still running (aiohttp's
    default is 60 s, twice over: a handler held open at teardown would run
    a test to pytest's 120 s timeout after its assertions passed)."""
    runner = web.AppRunner(
        app, handler_cancellation=handler_cancellation, shutdown_timeout=SHUTDOWN_S
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"
