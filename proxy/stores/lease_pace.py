"""How far ahead of need a worker leases, for the quota and the budgets alike
(and the background top-up every local lease uses, the Redis permits' too).

Both books lease blocks from Postgres under its 1/8-of-what-is-left rule and
top a lease up in the background before a request finds it empty. Under
load a fixed block means a lease call every few requests, and at large
prompts (a 32 KB request reserves ~17k tokens) the requests in flight hold
more than half a block, so they outrun the top-up and wait for Postgres on
the request path. So a busy lease's lease calls grow (top-ups and the
request path's refills alike, while far from the limit): once they have
come less than ``BUSY_S`` apart for ``BUSY_S``, each asks for twice the
blocks (up to ``MAX_SCALE``), at most one doubling a ``BUSY_S``, and it
halves again after a pause; its low-water mark is half of what the top-up
asks for, so the top-up is asked for while the requests in flight still
have room.

Nothing here changes the bound: a top-up of ``scale`` blocks is asked for
only while Postgres had ``FAR_BLOCKS`` of it more to give at the last lease
call (else a smaller one, else none: near the limit only the request path
leases, exactly as without top-ups), and Postgres grants at most 1/8 of what
is left. What a busy worker holds beyond its requests in flight is at most
one and a half top-ups of ``MAX_SCALE`` blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from proxy.core.tasks import TaskGroup
from proxy.stores import pgwait

LOW_WATER = 2  # top a lease up when 1/LOW_WATER of what its top-up asks for is left...
FAR_BLOCKS = 8  # ...while Postgres had at least this many of it more at the last lease call
BUSY_S = 1.0  # lease calls this close together for this long: the top-ups' blocks double...
MAX_SCALE = 16  # ...up to this many blocks a top-up


class Paced(Protocol):
    """A local lease as ``scaled`` reads and moves it."""

    refilled_at: float  # time.monotonic() of its last lease call (0: none yet)
    busy_since: float  # since when its lease calls came less than BUSY_S apart
    scale: int  # blocks a top-up asks for


def scaled(lease: Paced, now: float) -> None:
    """Before a lease call (a top-up, or a refill on the request path):
    double the lease's ``scale`` once its lease calls have come less than
    ``BUSY_S`` apart for ``BUSY_S`` (then again after another ``BUSY_S`` of
    it), halve it after a pause of ``BUSY_S`` or more."""
    if not lease.refilled_at or now - lease.refilled_at >= BUSY_S:
        lease.busy_since = 0.0
        lease.scale = max(1, lease.scale // 2)
    elif not lease.busy_since:
        lease.busy_since = now
    elif now - lease.busy_since >= BUSY_S:
        lease.busy_since = now
        lease.scale = min(MAX_SCALE, lease.scale * 2)


def far_block(block: int, scale: int, left: int | None) -> int:
    """The largest of ``block * scale``, ``block * scale // 2``, ... ``block`` that
    Postgres had ``FAR_BLOCKS`` of at the last lease call (0: none, or
    nothing leased yet)."""
    if left is None:
        return 0
    while scale > 1 and left < FAR_BLOCKS * block * scale:
        scale //= 2
    return block * scale if left >= FAR_BLOCKS * block * scale else 0


def low_water(block: int, ahead: int) -> int:
    """The level below which a lease is topped up: half of what its next
    top-up would ask for (``ahead``, e.g. ``far_block``'s), and never below
    half a ``block`` (when nothing would be leased ahead, the top-up is not
    asked for at all). Tied to what is asked, not to the scale alone, so a
    lease near the limit, whose top-ups are smaller, is not below its mark
    after every one of them."""
    return max(1, max(block, ahead) // LOW_WATER)


class Topped(Protocol):
    """A local lease that can be topped up in the background."""

    topping: bool  # a background top-up is under way


def top_up_soon(
    group: TaskGroup,
    lease: Topped,
    what: str,
    log: logging.Logger,
    work: Callable[..., Awaitable[object]],
    *args: object,
) -> None:
    """Run ``work(*args)`` (a top-up of ``lease``) as a task of ``group``,
    with ``lease.topping`` set until it ends; nothing when no loop is
    running. A top-up is ahead of need: when it fails, the request that
    finds the lease short refills it on its own, so a failure is only
    logged, and an unreachable database not even that."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return  # not on a loop: nothing to run it in the background
    lease.topping = True
    group.spawn(_topping(lease, what, log, work, args), name=f"{what}-top-up")


async def _topping(
    lease: Topped,
    what: str,
    log: logging.Logger,
    work: Callable[..., Awaitable[object]],
    args: tuple[object, ...],
) -> None:
    try:
        await work(*args)
    except pgwait.DatabaseDown:
        pass
    except Exception:
        log.exception("background %s top-up failed", what)
    finally:
        lease.topping = False
