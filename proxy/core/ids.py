"""Usage event ids: the kernel's randomness without a syscall per request.

An event id is the usage row's idempotency key (unique by period and id):
two requests drawing the same id would bill once, the second row silently
dropped by ``ON CONFLICT DO NOTHING``. So it comes from the kernel's CSPRNG,
not the process's Mersenne Twister (whose seed two workers could share).
``secrets.token_hex(12)`` asks the kernel on every call: one ``getrandom``
per billed request, the only syscall the billing path adds per request
that is not I/O. Here ``os.urandom`` is read 4 KiB at a time and handed out
12 bytes per id: the same bytes the kernel would have given, one syscall
per 341 ids.

A forked child must never hand out what its parent holds (both would issue
the same ids): the buffer is dropped in the child at fork
(``os.register_at_fork``), and each process owns its own from its first id.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

EVENT_ID_BYTES = 12  # 96 bits, 24 hex characters: what ``secrets.token_hex(12)`` gave
_CHUNK = 4096 - 4096 % EVENT_ID_BYTES  # 341 ids per read


class _Pool:
    __slots__ = ("_lock", "ids")

    def __init__(self) -> None:
        # The ids of the last read, hex-encoded and cut in one go: drawing
        # one is a ``next`` on a list iterator (atomic under the GIL, so two
        # threads never get the same one), no lock, no slicing per id.
        self.ids: Iterator[str] = iter(())
        self._lock = threading.Lock()  # one refill at a time

    def refill(self) -> str:
        with self._lock:
            got = next(self.ids, None)  # another thread refilled meanwhile
            if got is None:
                # hex-encoded with a space every 12 bytes and split, in C: a
                # Python slice per id cost ~0.7k instructions an id
                chunk = os.urandom(_CHUNK).hex(" ", EVENT_ID_BYTES)
                self.ids = iter(chunk.split(" "))
                got = next(self.ids)
            return got

    def forget(self) -> None:
        """In a forked child: nothing the parent holds may be handed out."""
        self.ids = iter(())
        self._lock = threading.Lock()  # a lock held by another thread at fork stays held


_POOL = _Pool()
os.register_at_fork(after_in_child=_POOL.forget)


def event_id() -> str:
    """24 hex characters of the kernel's randomness (as ``secrets.token_hex(12)``)."""
    return next(_POOL.ids, None) or _POOL.refill()
