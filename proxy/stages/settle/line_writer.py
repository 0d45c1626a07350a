"""The access log's output: lines gathered in memory, written in batches.

One ``logging`` call per request costs ~20 us (a LogRecord, the redaction
filter, a formatter, a lock and a ``write`` syscall of its own); the access
line needs none of that machinery. ``LineWriter`` keeps the lines of the
last 50 ms (or 64 KiB) and writes them with one ``os.write`` per
``PIPE_BUF`` of whole lines, so several workers sharing one stdout pipe
never interleave inside a line (a single line longer than that is written
alone, as a ``StreamHandler`` would). A line waits at most ``max_delay``
seconds; ``close`` writes what is left and makes later lines go out at once.
"""

from __future__ import annotations

import asyncio
import os
import select

_BATCH = getattr(select, "PIPE_BUF", 512)


class LineWriter:
    def __init__(self, fd: int, max_delay: float = 0.05, max_bytes: int = 65536) -> None:
        self._fd = fd
        self._delay = max_delay
        self._max = max_bytes
        self._lines: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.dropped = 0  # lines lost to a write error (a closed stdout)

    def add(self, line: bytes) -> None:
        """Queue one line (without its newline)."""
        self._lines.append(line + b"\n")
        self._size += len(line) + 1
        if self._closed or self._size >= self._max:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(self._delay, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines, self._lines, self._size = self._lines, [], 0
        batch: list[bytes] = []
        size = 0
        for line in lines:
            if batch and size + len(line) > _BATCH:
                self._write(b"".join(batch), len(batch))
                batch, size = [], 0
            batch.append(line)
            size += len(line)
        if batch:
            self._write(b"".join(batch), len(batch))

    def close(self) -> None:
        self.flush()
        self._closed = True

    def _write(self, data: bytes, lines: int) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            self.dropped += lines
