"""The one place where aiohttp client exceptions become gateway errors.

Adapters call ``post`` / ``read_body`` / ``iter_body`` and never see aiohttp
exceptions themselves (STYLE rule 6): connect failures and resets become
``UpstreamUnavailable`` (502), timeouts ``UpstreamTimeout`` (504), a broken
body mid-stream ``UpstreamStreamBroken`` (502).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final

import aiohttp
import orjson

from proxy.config.model import ProviderConfig, Timeouts
from proxy.core.errors import (
    GatewayError,
    ProviderHTTPError,
    UpstreamConnectError,
    UpstreamRedirect,
    UpstreamStreamBroken,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.core.sse import EventSplitter

# Response headers worth passing to the client from a provider's error.
PASSED_ERROR_HEADERS = ("retry-after", "retry-after-ms", "x-should-retry")


def client_timeout(cfg: ProviderConfig, timeouts: Timeouts | None = None) -> aiohttp.ClientTimeout:
    """The request's ClientTimeout. ``sock_read`` starts as ``first_byte``:
    the wait for the answer; ``post`` turns it into ``idle`` once the
    answer has begun (aiohttp has one read timer for both)."""
    t = timeouts or cfg.timeouts
    # By identity first: a config's Timeouts objects live as long as its
    # snapshot, and hashing a frozen dataclass hashes all its fields.
    known = _BY_ID.get(id(t))
    if known is not None and known[0] is t:
        return known[1]
    made = _client_timeout(t)
    if len(_BY_ID) >= 512:
        _BY_ID.clear()
    _BY_ID[id(t)] = (t, made)  # the entry keeps ``t`` alive: its id is not reused
    return made


_BY_ID: dict[int, tuple[Timeouts, aiohttp.ClientTimeout]] = {}


@functools.lru_cache(maxsize=512)
def _client_timeout(t: Timeouts) -> aiohttp.ClientTimeout:
    # Immutable both: one per distinct Timeouts, not one per request (a
    # non-stream total cut to the retry deadline is a new one each time).
    return aiohttp.ClientTimeout(total=t.total, sock_connect=t.connect, sock_read=t.first_byte)


async def post(
    session: aiohttp.ClientSession,
    cfg: ProviderConfig,
    url: str,
    payload: bytes,
    headers: dict[str, str],
    timeouts: Timeouts | None = None,
) -> aiohttp.ClientResponse:
    """POST and wait for the response headers, within ``first_byte``.
    ``timeouts`` (a call's, see ``Call.timeouts``) replaces the provider's.

    Each timeout means one thing, independently: ``first_byte`` the wait
    for the answer to begin, ``idle`` each gap once it has, ``total`` the
    whole request."""
    t = timeouts or cfg.timeouts
    try:
        # Never follow a redirect: it would carry the prompt and the provider's
        # credential (api-key, x-api-key, x-goog-api-key, extra headers; aiohttp
        # drops only Authorization) to whatever host the Location names.
        resp = await session.post(
            url,
            data=payload,
            headers=headers,
            timeout=client_timeout(cfg, t),
            allow_redirects=False,
        )
    except TimeoutError:
        waited = min(t.first_byte, t.total)
        raise UpstreamTimeout(
            f"provider '{cfg.name}' did not answer within {waited:.3g}s"
        ) from None
    except aiohttp.ClientConnectorError:
        raise UpstreamConnectError(f"provider '{cfg.name}' is unreachable") from None
    except (aiohttp.ClientError, OSError):
        raise UpstreamUnavailable(
            f"provider '{cfg.name}' closed the connection before answering"
        ) from None
    if 300 <= resp.status < 400:
        resp.close()
        raise UpstreamRedirect(
            f"provider '{cfg.name}' answered with a redirect (HTTP {resp.status}); "
            "redirects are not followed: set its base_url to the final address"
        )
    _idle_from_now_on(resp, t.idle)
    return resp


def _idle_from_now_on(resp: aiohttp.ClientResponse, idle: float) -> None:
    """Switch the read timer from ``first_byte`` to ``idle``. The timer
    running since the headers keeps ``first_byte`` until the first body
    bytes arrive (a stream's first event is still the first byte); each
    read after that is re-armed with ``idle``."""
    protocol = resp.connection.protocol if resp.connection is not None else None
    if protocol is None:
        return
    protocol.read_timeout = idle
    content = resp.content
    # Body bytes came with the headers: the answer has begun (re-armed with
    # ``idle``), unless they were all of it: no read is left to bound.
    if content.total_bytes and not content.is_eof():
        protocol.start_timeout()


async def read_body(
    resp: aiohttp.ClientResponse, cfg: ProviderConfig, timeouts: Timeouts | None = None
) -> bytes:
    """The whole body of a response ``post`` returned, then the connection
    back to the pool. Bounded by the request's ClientTimeout: the first
    bytes by ``first_byte``, each gap after by ``idle``, the whole by ``total``."""
    try:
        return await resp.read()
    except TimeoutError as exc:
        raise _timed_out(exc, cfg, timeouts or cfg.timeouts, "sending its response") from None
    except (aiohttp.ClientError, OSError):
        raise UpstreamUnavailable(f"provider '{cfg.name}' broke off its response") from None
    finally:
        resp.release()


async def iter_body(
    resp: aiohttp.ClientResponse, cfg: ProviderConfig, timeouts: Timeouts | None = None
) -> AsyncIterator[bytes]:
    """The raw body in arrival order; each gap between reads is bounded by
    ``idle`` (``sock_read``) and the whole stream by ``total``, both the
    request's ClientTimeout (``timeouts``, the call's: for the messages)."""
    try:
        async for chunk in resp.content.iter_any():
            yield chunk
    except TimeoutError as exc:
        raise _timed_out(exc, cfg, timeouts or cfg.timeouts, "mid-stream") from None
    except (aiohttp.ClientError, OSError):
        raise UpstreamStreamBroken(f"provider '{cfg.name}' broke off the stream") from None


class EventBody:
    """An SSE response body read as whole events, one upstream read at a
    time: the one loop a stream's bytes go through (no generator layers).

    The idle bound is kept here, not by aiohttp: its ``sock_read`` re-arms a
    timer on every read the socket makes; this keeps one timer per stream
    that, when it fires, looks at when the last bytes were read and either
    fires the timeout or re-arms for the rest of the gap. Same bound: the
    provider silent for ``idle`` once the answer has begun. Bytes already
    received but not yet read (the client is slow to take them) are not a
    provider's silence, as with aiohttp, which stops its timer when it stops
    reading. ``first_byte`` stays aiohttp's (the timer running since the
    headers), and ``total`` too (one timer per request).

    Read (``read``) or pushed (``pushed``): the same events either way, the
    same bounds, the same errors, raised by ``read``.
    """

    __slots__ = (
        "_cfg",
        "_check",
        "_content",
        "_deliver",
        "_got",
        "_handle",
        "_idle",
        "_loop",
        "_pushing",
        "_queued",
        "_split",
        "_timeouts",
        "last",
        "pending",
    )

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        cfg: ProviderConfig,
        timeouts: Timeouts | None,
        check: Callable[[bytes], bytes] | None = None,
    ) -> None:
        """``check``: given each read's whole events, returns what to pass
        on, or raises a gateway error (a provider's error event)."""
        self._content = resp.content
        self._cfg, self._timeouts, self._check = cfg, timeouts, check
        self._split = EventSplitter()
        self._loop = asyncio.get_running_loop()
        self.last = self._loop.time()  # when bytes were last read
        self._got = 0  # bytes read so far
        self._handle: asyncio.TimerHandle | None = None
        self.pending: GatewayError | None = None  # raised by the next read (``check`` sets it)
        self._pushing: asyncio.Future[None] | None = None  # set while ``pushed`` runs
        self._deliver: Callable[[bytes], bool] | None = None
        self._queued: list[bytes] | None = None  # pushed bytes waiting for ``_flush``
        self._idle = (timeouts or cfg.timeouts).idle
        protocol = resp.connection.protocol if resp.connection is not None else None
        if protocol is not None and self._idle:
            protocol.read_timeout = None  # from the next read on, ours
            if resp.content.total_bytes:  # the answer has begun: first_byte is over
                protocol.start_timeout()  # (drops the timer running since the headers)
            self._handle = self._loop.call_at(self.last + self._idle, self._expire)

    def _expire(self) -> None:
        content = self._content
        now = self._loop.time()
        if content.exception() is not None or content.is_eof():
            self._handle = None
            return
        if not content.total_bytes or content.total_bytes > self._got:
            # Not begun (first_byte's to bound), or bytes wait for us: not silence.
            due = now + self._idle
        elif now - self.last >= self._idle:
            self._handle = None
            content.set_exception(aiohttp.ServerTimeoutError("Timeout on reading data from socket"))
            return
        else:
            due = self.last + self._idle
        self._handle = self._loop.call_at(due, self._expire)

    async def read(self) -> bytes:
        """The whole events of the next upstream read(s), as one bytes;
        b"" at the end of the stream."""
        if self.pending is not None:
            raise self.pending
        content, split = self._content, self._split
        while True:
            try:
                chunk = await content.readany()
            except TimeoutError as exc:
                self.close()
                raise _timed_out(
                    exc, self._cfg, self._timeouts or self._cfg.timeouts, "mid-stream"
                ) from None
            except (aiohttp.ClientError, OSError):
                self.close()
                raise UpstreamStreamBroken(
                    f"provider '{self._cfg.name}' broke off the stream"
                ) from None
            if not chunk:
                self.close()
                if split.tail():
                    raise UpstreamStreamBroken(
                        f"provider '{self._cfg.name}' ended the stream mid-event"
                    )
                return b""
            self.last = self._loop.time()
            self._got += len(chunk)
            events = split.feed(chunk)
            if events:
                return self._check(events) if self._check is not None else events

    async def pushed(self, deliver: Callable[[bytes], bool]) -> None:
        """Hand the whole events of each upstream read to ``deliver`` from
        the connection's own data callback, as ``read`` would return them,
        until that can no longer be done; then return, and ``read`` takes
        over (it sees the end, the error or the bytes left). Per read: no
        future, no task wake-up, no coroutine frames (the relay's loop, the
        guard, this, aiohttp's ``readany`` and ``_wait``).

        ``deliver`` returns False to stop (its client is not taking bytes:
        the caller waits for it, then reads, or pushes again); an exception
        it raises is raised here. A provider's error event, the idle bound
        (``_expire``) and the total time (aiohttp's timer, entered here as
        ``readany`` would) end the pushing and are raised by the next
        ``read``, so the guard reports them to the breaker as before. Only
        for a plain aiohttp ``StreamReader`` with nothing buffered; otherwise
        this returns at once."""
        content = self._content
        if (
            type(content) not in _PUSHABLE
            or content._buffer  # read those first, in order
            or content.is_eof()
            or content.exception() is not None
            or self.pending is not None
        ):
            return
        self._pushing = waiter = self._loop.create_future()
        self._deliver = deliver
        content.__class__ = _PushReader  # same layout; behaves as its base unless in _PUSHING
        _PUSHING[content] = self
        try:
            with content._timer:  # the request's total time, as aiohttp's own wait
                await waiter
        except TimeoutError as exc:
            self.pending = _timed_out(
                exc, self._cfg, self._timeouts or self._cfg.timeouts, "mid-stream"
            )
        finally:
            _PUSHING.pop(content, None)
            # Still queued: the task was cancelled (the client is gone, or
            # shutdown) before the loop came round to it; nobody gets it.
            self._queued = self._pushing = self._deliver = None

    def _take(self, data: bytes) -> None:
        """One upstream body piece while pushing (``_PushReader.feed_data``):
        queued, and the queue handed on once the connection's callback has
        fed all it received (``_flush``, next in the loop): one piece per
        socket read, as ``readany`` would have taken them, so a read of many
        small HTTP chunks is still split, metered and written once."""
        self.last = self._loop.time()
        self._got += len(data)
        queued = self._queued
        if queued is None:
            self._queued = [data]
            self._loop.call_soon(self._flush)
        else:
            queued.append(data)

    def _flush(self) -> None:
        queued = self._queued
        if queued is None or self._pushing is None:
            return
        self._queued = None
        data = queued[0] if len(queued) == 1 else b"".join(queued)
        try:
            events = self._split.feed(data)
            if events and self._check is not None:
                events = self._check(events)
            if events and not self._deliver(events):  # type: ignore[misc]
                self._stop()
        except GatewayError as exc:  # the provider's error event: the guard's to report
            self.pending = exc
        except Exception as exc:  # noqa: BLE001 - raised in the relay task, where pull would
            # have raised it (the client gone): a callback must not throw into the parser
            self._stop(exc)
            return
        if self.pending is not None:
            self._stop()

    def _stop(self, exc: BaseException | None = None) -> None:
        if exc is None and self._queued is not None:
            self._flush()  # what arrived before the end (or the error) goes first
        _PUSHING.pop(self._content, None)
        waiter, self._pushing = self._pushing, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    def close(self) -> None:
        if self._pushing is not None:
            self._stop()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


# The readers being pushed from, and whose body takes their bytes.
_PUSHING: Final[dict[aiohttp.StreamReader, EventBody]] = {}


class _PushReader(aiohttp.StreamReader):
    """aiohttp's reader, its bytes handed on as they are fed while its
    ``EventBody`` is pushing (``EventBody.pushed``): counted as received and
    read (``total_bytes``, the cursor), never buffered, no waiter woken.
    Otherwise, and for anything but plain bytes arriving in order, exactly
    its base. Swapped in by ``__class__`` (the base has ``__slots__``; this
    adds none): the HTTP parser holds the instance."""

    __slots__ = ()

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        body = _PUSHING.get(self)
        if body is None or not data:
            return super().feed_data(data, size)
        if self._buffer or self._exception is not None:  # not ours to overtake: ``read``'s
            super().feed_data(data, size)
            body._stop()
            return False
        n = len(data)
        self.total_bytes += n
        self._cursor += n
        body._take(data)
        return False

    def end_http_chunk_receiving(self) -> None:
        if self in _PUSHING:
            return  # nobody reads by HTTP chunk here, and nothing waits to be woken
        super().end_http_chunk_receiving()

    def feed_eof(self) -> None:
        super().feed_eof()
        body = _PUSHING.get(self)
        if body is not None:
            body._stop()  # ``read`` sees the end (and a cut event, if any)

    def set_exception(self, *args: Any, **kwargs: Any) -> None:
        super().set_exception(*args, **kwargs)
        body = _PUSHING.get(self)
        if body is not None:
            body._stop()  # ``read`` raises it, as it would have


_PUSHABLE: Final = (aiohttp.StreamReader, _PushReader)


def _timed_out(exc: TimeoutError, cfg: ProviderConfig, t: Timeouts, what: str) -> UpstreamTimeout:
    # aiohttp raises its own ServerTimeoutError for sock_read (the idle gap)
    # and a plain TimeoutError when the request's total time runs out.
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return UpstreamTimeout(f"provider '{cfg.name}' stalled for more than {t.idle:g}s {what}")
    return UpstreamTimeout(f"provider '{cfg.name}' exceeded its total time of {t.total:.3g}s")


def passed_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The provider headers a client may see on an error (``retry-after``...)."""
    return {h: headers[h] for h in PASSED_ERROR_HEADERS if h in headers}


def openai_error(status: int, body: bytes, headers: Any, cfg: ProviderConfig) -> GatewayError:
    """A provider's non-2xx answer as a client-facing error, status kept."""
    err: dict[str, Any] = {}
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        err = parsed["error"]
    elif isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        err = {"message": parsed["error"]}
    if not err.get("message"):
        err = {**err, "message": f"provider '{cfg.name}' returned HTTP {status}"}
    return ProviderHTTPError(status, err, headers=passed_headers(headers))
