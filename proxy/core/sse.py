"""Server-sent events on the wire: split a byte stream into whole events.

Upstream bytes arrive in arbitrary TCP pieces; the relay forwards only whole
events so a client never sees half a JSON line, even when the upstream dies
mid-event.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

import orjson

DONE = b"data: [DONE]\n\n"

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
}


async def iter_events(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Yield complete events (each ending in a blank line, LF-normalised)."""
    async for batch in iter_event_batches(chunks):
        for event in batch:
            yield event


async def iter_event_batches(chunks: AsyncIterable[bytes]) -> AsyncIterator[list[bytes]]:
    """Yield the complete events each upstream read completed, as one list
    (never empty), so a relay can pass them on in one write."""
    buf = b""
    async for chunk in chunks:
        buf += chunk
        if b"\r" in buf:
            # Normalise on the buffer, not the chunk: a CRLF may be split
            # across two reads ("...\r" | "\n..."), and the "\r" waits here.
            buf = buf.replace(b"\r\n", b"\n")
        batch = []
        start = 0
        while (end := buf.find(b"\n\n", start)) >= 0:
            event = buf[start : end + 2]
            start = end + 2
            if event.strip():
                batch.append(event)
        if start:
            buf = buf[start:]
        if batch:
            yield batch
    if buf.strip():
        # A trailing event without its blank line: the stream was cut.
        raise IncompleteEvent(buf)


class EventSplitter:
    """Whole events out of arbitrary reads, as one bytes per read: the relay
    writes them in one piece and meters them without splitting them first."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> bytes:
        """The whole events this chunk completed (b"": none yet),
        LF-normalised, blank ones left out."""
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:  # see iter_event_batches: a CRLF may straddle two reads
            buf = buf.replace(b"\r\n", b"\n")
        first = buf.find(b"\n\n")
        if first < 0:
            self._buf = buf
            return b""
        if first == len(buf) - 2:  # exactly one event and nothing after it: the usual read
            self._buf = b""
            return b"" if buf.isspace() else buf
        # Separators found left to right without overlap, as iter_event_batches does.
        parts = buf.split(b"\n\n")
        rest = self._buf = parts.pop()
        kept = [p for p in parts if p and not p.isspace()]
        if len(kept) == len(parts):
            return buf[: len(buf) - len(rest)] if rest else buf
        return b"\n\n".join(kept) + b"\n\n" if kept else b""

    def tail(self) -> bytes:
        """What is left unfinished (a cut stream's last, partial event)."""
        return self._buf if self._buf.strip() else b""


def split_events(region: bytes) -> list[bytes]:
    """The events of a region ``EventSplitter.feed`` returned, one by one."""
    parts = region.split(b"\n\n")
    parts.pop()
    return [p + b"\n\n" for p in parts]


class IncompleteEvent(Exception):
    def __init__(self, tail: bytes) -> None:
        super().__init__("stream ended inside an event")
        self.tail = tail


def event_data(event: bytes) -> bytes | None:
    """The joined ``data:`` payload of one event, or None for comments."""
    if event.startswith(b"data: ") and event.count(b"\n") == 2:
        return event[6:-2]  # the common case: one data line
    parts = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            parts.append(line[6:] if line[5:6] == b" " else line[5:])
    return b"\n".join(parts) if parts else None


def data_event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"
