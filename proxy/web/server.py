"""Run the app on a socket until SIGINT/SIGTERM, with one-line startup errors.

SIGTERM (or SIGINT) drains gracefully (``lifecycle.shutdown``: readyz 503,
stop accepting, in-flight requests get ``server.shutdown_grace_s``, then an
SSE error event, usage flushed); a second one cuts the grace short. SIGHUP
reloads the config file. ``reuse_port`` lets the workers of ``tollway serve
--workers N`` share one port (``SO_REUSEPORT``: the kernel spreads
connections over them).
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import signal
from collections.abc import Callable

from aiohttp import web

from proxy.web.http_guard import MAX_FIELD_BYTES, MAX_HEADERS, Guard, GuardedRunner
from proxy.web.keys import CONFIG, GUARD_STATS, LIFECYCLE, SERVER
from proxy.web.lifecycle import shutdown
from proxy.web.reload import RELOADER

log = logging.getLogger("tollway.server")


class StartupError(RuntimeError):
    """A problem the operator must fix; printed as one line, no traceback."""


def install_fast_loop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _tune_gc() -> None:
    """Every request allocates a few hundred short-lived objects, so the
    cyclic GC's default generation-0 threshold (700) runs a collection every
    couple of requests, each one walking the young objects of everything in
    flight. Objects alive after start-up (config, modules, pools) are frozen
    out of collections, and collections run 50x less often; memory freed by
    reference counting, nearly all of it, is unaffected."""
    if os.environ.get("TOLLWAY_GC_TUNE", "1") == "0":
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(35_000, 20, 20)


def make_runner(app: web.Application) -> web.AppRunner:
    # handler_cancellation: a client that disconnects cancels its handler, so
    # the provider request is cancelled at once instead of running on unseen.
    # Header limits (http_guard): a 10 KB junk Authorization header still
    # reaches the auth stage (an OpenAI-shaped 401); past 16 KiB a line, or
    # 100 lines, the parser refuses it with a 431 and a close.
    cfg = app[SERVER]
    guard = Guard(cfg.header_timeout_s, cfg.body_timeout_s, cfg.max_connections)
    return GuardedRunner(
        app,
        guard,
        app[GUARD_STATS],
        access_log=None,
        handle_signals=False,
        handler_cancellation=True,
        max_field_size=MAX_FIELD_BYTES,
        max_line_size=MAX_FIELD_BYTES,
        max_headers=MAX_HEADERS,
    )


async def serve(
    app: web.Application,
    host: str,
    port: int,
    ready_line: str = "",
    *,
    reuse_port: bool = False,
    on_ready: Callable[[], None] | None = None,
    parent_pid: int | None = None,
    listen: bool = True,
) -> None:
    """``parent_pid``: a supervisor whose disappearance stops this worker.
    ``listen=False``: the app's resources and background work (a batch
    process) without a socket."""
    runner = make_runner(app)
    await runner.setup()
    await _listen(runner, host, port, reuse_port=reuse_port, listen=listen)
    stop = _stop_on_signals(app, parent_pid)
    _tune_gc()
    # Only now: a SIGTERM sent as soon as this line appears must still clean up.
    if ready_line:
        print(ready_line, flush=True)
    if on_ready is not None:
        on_ready()
    try:
        await stop.wait()
    finally:
        await shutdown(runner, app[CONFIG].current.config.server.shutdown_grace_s)


async def _listen(
    runner: web.AppRunner, host: str, port: int, *, reuse_port: bool, listen: bool
) -> None:
    """Open the socket (when ``listen``); a port that cannot be had is a
    ``StartupError`` naming it, after the app's resources are closed."""
    site = web.TCPSite(
        runner, host, port, backlog=4096, reuse_address=True, reuse_port=reuse_port or None
    )
    try:
        if listen:
            await site.start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"port {port} on {host} is already in use") from None
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            raise StartupError(f"cannot listen on {host}: address not available") from None
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _stop_on_signals(app: web.Application, parent_pid: int | None) -> asyncio.Event:
    """Set by SIGINT or SIGTERM (a second one cuts the grace short), or
    when the supervisor ``parent_pid`` is gone; SIGHUP reloads the config."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop() -> None:
        if stop.is_set():
            app[LIFECYCLE].hurry()  # a second signal: no more grace
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: app[RELOADER].reload("SIGHUP"))
    if parent_pid is not None:

        def check_parent() -> None:
            if os.getppid() != parent_pid:
                log.error("the supervisor is gone: stopping")
                on_stop()
            else:
                loop.call_later(1.0, check_parent)

        loop.call_later(1.0, check_parent)
    return stop
