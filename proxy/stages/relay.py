"""The relay stage: hand the answer to the client as it arrives.

Streams are a tee: the whole SSE events of each upstream read are written to
the client as soon as the provider sends them (one write for all of them),
while ``StreamMeter`` watches each event for usage on the side. A plain
pass-through stream (no chunk filters, no front-door translation) is, after
its first write, relayed from the upstream connection's callback
(``UpstreamStream.pushed``, ``_Direct``): no wake-up of this task per read;
the task resumes at the end, on a failure, or to wait for a slow client
(whose socket buffer, once full, stops the reading of the provider).
Once SSE headers are out, a failure can no longer change the status, so it
becomes an OpenAI-shaped ``data: {"error": ...}`` event and a clean close.
The stream's end (its last HTTP chunk), like a whole answer (``reply``'s
response), is sent by the pipeline (``pipeline.run.answer``) before the
request settles: the client never waits for the access line or the billing.

Client disconnect: the server runs with ``handler_cancellation``, so the
handler is cancelled the moment the client goes away (or the next write
fails, whichever comes first); the upstream response is then closed at once,
cancelling the provider's request rather than draining it, and the usage of
what was delivered so far goes to the settle stage.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from aiohttp import ClientConnectionResetError, web
from aiohttp.http_writer import StreamWriter

from proxy.core import metering, redact
from proxy.core.errors import ContentFiltered, GatewayError, UpstreamStreamBroken
from proxy.core.lifecycle import Lifecycle, shutting_down
from proxy.core.metering import StreamMeter
from proxy.core.record import UsageRecord
from proxy.core.sse import SSE_HEADERS, data_event
from proxy.core.usage import Usage
from proxy.providers.base import Reply, UpstreamStream
from proxy.stages.base import AsyncChunkFilter, ChunkFilter, Door, DoorStream


async def reply(
    result: Reply,
    headers: dict[str, str],
    record: UsageRecord,
    body: dict[str, Any],
    model: str,
    door: Door | None = None,
) -> web.Response:
    usage = result.usage
    if usage is None or usage.total_tokens == 0:
        # Counting is proportional to the answer: off the event loop.
        usage = await metering.off_loop(_reply_usage, result, body, record.endpoint, model)
    record.usage = usage
    record.status = result.status
    answer = result.body if door is None or result.status >= 400 else door.reply(result.body)
    return web.Response(
        body=answer, status=result.status, headers=headers, content_type="application/json"
    )


def _reply_usage(result: Reply, body: dict[str, Any], endpoint: str, model: str) -> Usage:
    try:
        parsed = orjson.loads(result.body)
    except orjson.JSONDecodeError:
        parsed = None
    return metering.reply_usage(result.usage, parsed, body, endpoint, model)


async def stream(
    request: web.Request,
    upstream: UpstreamStream,
    meter: StreamMeter,
    headers: dict[str, str],
    record: UsageRecord,
    started: float,
    lifecycle: Lifecycle,
    filters: Sequence[ChunkFilter] = (),
    door: DoorStream | None = None,
) -> web.StreamResponse:
    """``filters``: the stages' chunk filters, in order (usually none);
    ``door``: the front door's translation, after them (None: chat as it is)."""
    plain = not filters and door is None
    # Plain: the first events are in hand (forward read them before it chose
    # this attempt), so the headers go out in the same send() as they do.
    resp = (_Coalesced if plain else web.StreamResponse)(headers={**SSE_HEADERS, **headers})
    lifecycle.streams += 1
    try:
        await resp.prepare(request)  # inside: a client gone already still closes upstream
        # One write per upstream read, however many events it carried: a
        # write is a chunk frame and a send() of its own. One loop, one
        # call per read (``UpstreamStream.read``), no generator layers.
        read = upstream.read
        pushed = upstream.pushed if plain else None
        while batch := await read():
            out = meter.observe_read(batch)
            for chunk_filter in filters:
                if out:
                    if isinstance(chunk_filter, AsyncChunkFilter):
                        out = await chunk_filter.feed_async(out)
                    else:
                        out = chunk_filter.feed(out)
            if door is not None and out:
                out = door.feed(out)
            if not out:
                continue
            if record.ttft_ms is None:
                record.ttft_ms = (time.perf_counter() - started) * 1000
            await resp.write(out)
            if pushed is not None and not await _push(pushed, resp, meter, record, started):
                pushed = None  # not a plain chunked response: write as above
        await _end(resp, meter, record, door)
    except GatewayError as exc:
        await _fail(resp, exc, record, door)
    except ConnectionResetError:
        _client_gone(record)
    except asyncio.CancelledError:
        if not lifecycle.aborting:
            # With handler_cancellation on, a client disconnect cancels us even
            # while we wait on the provider; closing upstream cancels its work too.
            _client_gone(record)
            raise
        await _shut_down(resp, record, door)
    finally:
        lifecycle.streams -= 1
        await upstream.aclose()
    return resp


async def _end(
    resp: web.StreamResponse, meter: StreamMeter, record: UsageRecord, door: DoorStream | None
) -> None:
    """After the last read: decide, by what arrived, whether the stream
    was whole, and write what the meter still holds."""
    if not meter.done:
        # A whole answer missing only its [DONE] is a success; anything
        # less was cut off.
        if not meter.complete():
            raise UpstreamStreamBroken("The provider ended the stream before it was complete.")
        tail = meter.end()
        if tail:
            await resp.write(tail if door is None else door.feed(tail))
    if meter.failure is not None:
        record.fail(meter.failure)  # the client already has the API's failure event


async def _fail(
    resp: web.StreamResponse, exc: GatewayError, record: UsageRecord, door: DoorStream | None
) -> None:
    """The headers are out: the failure becomes the stream's last event."""
    record.fail(exc)
    # A guardrail's block: the safe text it held and a content_filter finish go first.
    tail = exc.stream_tail if isinstance(exc, ContentFiltered) else b""
    if door is not None:
        tail = door.feed(tail) if tail else b""
    error = data_event(exc.payload()) if door is None else door.fail(exc)
    await _write_quietly(resp, tail + redact.scrub_bytes(error))


async def _shut_down(
    resp: web.StreamResponse, record: UsageRecord, door: DoorStream | None
) -> None:
    """Shutdown, grace period over: end the stream with an error event the
    client can read, then cleanly; what was delivered is still billed."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    gone = shutting_down()
    record.fail(gone)
    if resp.prepared:
        await _write_quietly(resp, door.fail(gone) if door else data_event(gone.payload()))


async def _push(
    pushed: Callable[[Callable[[bytes], bool]], Awaitable[None]],
    resp: web.StreamResponse,
    meter: StreamMeter,
    record: UsageRecord,
    started: float,
) -> bool:
    """Relay the reads from the upstream connection's callback
    (``UpstreamStream.pushed``) until that stops: the end, a failure, or a
    client slower than the provider (waited for here); then the relay's
    loop reads again. Once per hand-off, not per read. False: ``resp`` is
    not a plain chunked response (``_Direct.of``), so the loop writes
    every read itself."""
    direct = _Direct.of(resp, meter, record, started)
    if direct is None:
        return False
    await pushed(direct.deliver)
    if direct.protocol.writing_paused:
        await direct.writer.drain()
    return True


class _Coalesced(web.StreamResponse):
    """A stream whose headers wait for its first write and go out with it
    (one send(), one segment for the client to read), as aiohttp's own
    ``web.Response`` does. Only where that first write is immediate."""

    _send_headers_immediately = False


class _Direct:
    """The relay's work on one read of whole events, done where the bytes
    arrive (``UpstreamStream.pushed``): meter them, then write them to the
    client's transport as one HTTP chunk, as ``StreamResponse.write`` would
    (same frame, same ``output_size``), without its two coroutines. Only for
    a response aiohttp writes as plain chunks (no compression, no length,
    headers sent, no write hooks): ``of`` returns None for any other."""

    __slots__ = ("meter", "protocol", "record", "started", "writer")

    def __init__(
        self,
        writer: StreamWriter,
        meter: StreamMeter,
        record: UsageRecord,
        started: float,
    ) -> None:
        self.writer, self.protocol = writer, writer.protocol
        self.meter, self.record, self.started = meter, record, started

    @classmethod
    def of(
        cls, resp: web.StreamResponse, meter: StreamMeter, record: UsageRecord, started: float
    ) -> _Direct | None:
        writer = getattr(resp, "_payload_writer", None)
        if (
            type(writer) is not StreamWriter
            or not writer.chunked
            or writer.length is not None
            or getattr(writer, "_compress", True) is not None
            or getattr(writer, "_headers_buf", True) is not None
            or getattr(writer, "_on_chunk_sent", True) is not None
            or getattr(writer, "on_body_write", None) is not None
            or not hasattr(writer.protocol, "writing_paused")
        ):
            return None
        return cls(writer, meter, record, started)

    def deliver(self, events: bytes) -> bool:
        """Whether to go on: False once the client's socket buffer is full."""
        protocol = self.protocol
        transport = protocol.transport
        if transport is None or transport.is_closing():
            raise ClientConnectionResetError("Cannot write to closing transport")
        out = self.meter.observe_read(events)
        if out:
            if self.record.ttft_ms is None:
                self.record.ttft_ms = (time.perf_counter() - self.started) * 1000
            frame = b"%x\r\n%b\r\n" % (len(out), out)
            self.writer.output_size += len(frame)
            transport.write(frame)
        return not protocol.writing_paused


def _client_gone(record: UsageRecord) -> None:
    record.client_disconnected = True
    record.status = 499  # nginx's "client closed request"


async def _write_quietly(resp: web.StreamResponse, data: bytes) -> None:
    try:
        await resp.write(data)
    except ConnectionResetError:
        pass
