"""Waiting for a condition in a test, with a bound, instead of sleeping.

A fixed sleep guesses how long something takes; on a loaded machine the
guess is wrong and the test flakes, on an idle one it wastes time. ``until``
polls the condition and fails with a message naming it once ``timeout``
has passed. A sleep that remains in a test is the behaviour under test (a
deliberate delay, a window in which something must NOT happen) and says so.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

Check = Callable[[], object | Awaitable[object]]


async def until(check: Check, limit: float = 5.0, interval: float = 0.02, what: str = "") -> float:
    """Seconds until ``check()`` (sync or async) is truthy; fails after ``limit``
    (an async check that hangs is cut off by the same bound)."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(limit):
            while True:
                result = check()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return time.monotonic() - started
                await asyncio.sleep(interval)
    except TimeoutError:
        name = what or getattr(check, "__qualname__", repr(check))
        raise AssertionError(f"not true within {limit}s: {name}") from None


def until_sync(
    check: Callable[[], object], limit: float, interval: float = 0.02, what: str = ""
) -> float:
    """``until`` for a test without an event loop (a subprocess polled over
    sockets): seconds until ``check()`` is truthy; fails after ``limit``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started >= limit:
            name = what or getattr(check, "__qualname__", repr(check))
            raise AssertionError(f"not true within {limit}s: {name}")
        time.sleep(interval)
    return time.monotonic() - started
