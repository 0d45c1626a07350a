"""Where the event loop's tasks wait when a test times out.

pytest-timeout (``timeout = 120``, its signal method) fails a test that
hangs, printing the stack of every thread but the main one; the main
thread's own is the event loop in ``select``, which cannot say which
coroutine waits on what. A hang in a fixture's setup or teardown (a
server's shutdown, a pool's close) looks the same. ``report_tasks_on_alarm``
wraps pytest-timeout's alarm handler so that it first prints the stack of
every task of the running loop, whatever phase of the test hung.
"""

from __future__ import annotations

import asyncio
import io
import os
import selectors
import signal
import socket
import traceback
from types import FrameType

import pytest


def task_stacks() -> str:
    """Where every task of the loop running in this thread waits ("" if none):
    its whole chain of awaits, down to the future it is parked on
    (``Task.print_stack`` shows only the task's outermost coroutine)."""
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:  # no loop running here: the thread stacks say it all
        return ""
    out = io.StringIO()
    for task in tasks:
        out.write(f"{task!r}\n")
        awaited = [(f, f.f_lineno) for f in _await_frames(task.get_coro())]
        out.write("".join(traceback.StackSummary.extract(awaited).format()))
    return out.getvalue()


def selector_fds() -> str:
    """What the running loop's selector watches, fd by fd, beside what each
    fd is now (a listening socket and its address, a connection, a pipe):
    a socket the loop never polls (its fd closed behind the loop's back, the
    number reused, the stale entry kept) accepts or reads nothing, which
    looks like a hang with no task waiting on it."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return ""
    selector = getattr(loop, "_selector", None)
    if not isinstance(selector, selectors.BaseSelector):
        return ""
    out = io.StringIO()
    for fd, key in sorted(selector.get_map().items()):
        try:
            what = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            what = "(closed)"
        if what.startswith("socket:"):
            try:
                sock = socket.socket(fileno=os.dup(fd))
                with sock:
                    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    what += f" {'listening' if listening else 'connected'} {sock.getsockname()}"
            except OSError as exc:
                what += f" ({exc})"
        reader, writer = key.data if isinstance(key.data, tuple) else (key.data, None)
        out.write(f"fd {fd} events={key.events} {what} reader={reader!r} writer={writer!r}\n")
    return out.getvalue()


def _await_frames(coro: object) -> list[FrameType]:
    """The frames of ``coro`` and of what it awaits, outermost first."""
    frames = []
    while coro is not None:
        frame = next(
            (f for a in ("cr_frame", "gi_frame", "ag_frame") if (f := getattr(coro, a, None))),
            None,
        )
        if frame is not None:
            frames.append(frame)
        coro = next(
            (c for a in ("cr_await", "gi_yieldfrom", "ag_await") if (c := getattr(coro, a, None))),
            None,
        )
    return frames


def report_tasks_on_alarm(item: pytest.Item) -> None:
    """Print the loop's tasks before the SIGALRM handler pytest-timeout set."""
    inner = signal.getsignal(signal.SIGALRM)
    if not callable(inner):  # the thread method, or no timeout: nothing to wrap
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        __tracebackhide__ = True
        terminal = item.config.get_terminal_writer()
        terminal.sep("+", title="Tasks of the event loop")
        terminal.write(task_stacks() or "(no event loop running)\n")
        terminal.sep("+", title="What the loop's selector watches")
        terminal.write(selector_fds() or "(no selector loop running)\n")
        inner(signum, frame)

    signal.signal(signal.SIGALRM, handler)
