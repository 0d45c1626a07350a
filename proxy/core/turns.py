"""A budget per turn of the event loop for the requests' first steps.

At saturation one turn of the loop runs the first step (read and parse the
body, validate, admit, forward) of every request whose bytes arrived
together: 6 to 40 of them, up to several ms of CPU, during which no timer
fires and no other socket is served (bench/RESULTS.md, "what holds the
loop"). No single step is long; their number in one turn is.

``TurnBudget.spent`` tells a request about to take its first step whether
the current turn has already run ``budget`` seconds of such steps; if so the
request yields (``pause``: ``asyncio.sleep(0)``, its task to the back of the
ready queue), and the loop polls its sockets and runs its due timers before
it goes on. Requests keep their order (the ready queue is FIFO, and a
yielded request is queued before anything that arrives after it), and one
yields at most ``MAX_PAUSES`` times, so none waits behind later ones.

The turn is not visible to Python: its start is taken as the first check in
it (a request's step that ran before the first check is not counted), and a
``call_soon`` callback, queued at that first check, clears the mark as the
next turn runs its queue (before the requests that yielded, which were
queued after it). Below saturation a turn rarely holds two first steps, no
request yields, and the cost is one clock read and one comparison per
request, plus one ``call_soon`` per turn that checked.
"""

from __future__ import annotations

import asyncio
import time

BUDGET_S = 0.001  # half of the 2 ms the issue allows a timer to be late
MAX_PAUSES = 8  # then it runs whatever the turn has spent


class TurnBudget:
    """One per event loop (the app's ``Runtime``)."""

    __slots__ = ("_loop", "_mark", "budget")

    def __init__(self, budget: float = BUDGET_S) -> None:
        self.budget = budget
        self._mark: float | None = None  # when this turn's first check ran
        self._loop: asyncio.AbstractEventLoop | None = None

    def spent(self) -> bool:
        """Whether this turn has run more than ``budget`` since its first check."""
        now = time.perf_counter()
        mark = self._mark
        if mark is None:
            self._mark = now
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._clear)
            return False
        return now - mark > self.budget

    def _clear(self) -> None:
        self._mark = None

    async def pause(self) -> None:
        """Yield to the next turn(s) until one has budget left (at most ``MAX_PAUSES``)."""
        for _ in range(MAX_PAUSES):
            await asyncio.sleep(0)
            if not self.spent():
                return
