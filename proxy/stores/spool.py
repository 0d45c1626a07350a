"""The spool: batches of usage rows Postgres could not take, kept on disk.

One fsynced JSON line per row (``UsageRow.to_json``), appended when a batch
cannot be written and replayed by the ledger when Postgres answers again.
Each file is owned through an exclusive ``flock`` on a lock file beside it
(``_try_lock``, which the request journal uses for its own file too).
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

import orjson

from proxy.stores.usage_batch import UsageRow

log = logging.getLogger("tollway.ledger")


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class Spool:
    """A durable append-only file of rows that could not be written yet.

    Its owner holds an exclusive ``flock`` on a lock file beside it for its
    whole life, so a later process can tell a dead worker's spool (lock
    free) from a live one's and replay only the former.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _try_lock(path.with_suffix(".lock"))
        if self._lock_fd is None:
            raise RuntimeError(f"spool {path.name} is owned by a live process")

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def append(self, rows: list[UsageRow]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as fh:
            fh.write(b"".join(r.to_json() + b"\n" for r in rows))
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[UsageRow]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_bytes().splitlines():
            try:
                rows.append(UsageRow.from_json(line))
            except (orjson.JSONDecodeError, KeyError, ValueError, IndexError):
                log.error("skipping an unreadable spool line (%d bytes)", len(line))
        return rows

    def depth(self) -> int:
        if not self.path.exists():
            return 0
        with open(self.path, "rb") as fh:
            return sum(1 for _ in fh)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
