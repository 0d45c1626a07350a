"""What is in flight in one worker, and whether it is going away.

The web layer's ``track`` middleware registers each request's task here and
its ``shutdown`` drains them (``proxy.web.lifecycle`` tells the whole
sequence); the relay counts the SSE streams open to clients and ends them
with an error event once ``aborting`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from proxy.core.errors import ShuttingDown

log = logging.getLogger("tollway.lifecycle")
ABORT_WAIT = 10.0  # after the grace: how long aborted handlers get to settle


def shutting_down() -> ShuttingDown:
    return ShuttingDown("The gateway is shutting down; retry the request.")


class Lifecycle:
    """Per app: what is in flight, and whether the instance is going away."""

    def __init__(self) -> None:
        self.draining = False
        self.aborting = False
        self.streams = 0
        self._tasks: set[asyncio.Task[object]] = set()
        self._hurried = False
        self._idle = asyncio.Event()  # no request in flight, or hurried
        self._idle.set()

    @property
    def requests(self) -> int:
        return len(self._tasks)

    def enter(self, task: asyncio.Task[object]) -> None:
        self._tasks.add(task)
        if not self._hurried:
            self._idle.clear()

    def leave(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self._idle.set()

    def hurry(self) -> None:
        """End the grace period now (a second SIGTERM)."""
        self._hurried = True
        self._idle.set()

    async def drain(self, grace: float) -> int:
        """Wait up to ``grace`` s (less if hurried) for in-flight requests;
        abort the rest. Returns how many were aborted."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._idle.wait()
        left = list(self._tasks)
        if not left:
            return 0
        log.warning("grace period over: aborting %d in-flight request(s)", len(left))
        self.aborting = True
        for task in left:
            task.cancel()
        await asyncio.wait(left, timeout=ABORT_WAIT)
        return len(left)
