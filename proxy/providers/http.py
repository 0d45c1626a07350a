"""The one place where the provider client's failures become gateway errors.

Adapters call ``post`` / ``read_body`` / ``iter_body`` / ``EventBody`` on the
gateway's own HTTP/1.1 client (``providers.pool``) and never see its
failures themselves (STYLE rule 6): connect failures become
``UpstreamConnectError``, resets ``UpstreamUnavailable`` (502), timeouts
``UpstreamTimeout`` (504), a broken body mid-stream ``UpstreamStreamBroken``
(502).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

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
from proxy.providers.h1 import Broken, ConnectFailed, Failure, Response, TimedOut, Undecodable
from proxy.providers.pool import Pool

# Response headers worth passing to the client from a provider's error.
PASSED_ERROR_HEADERS = ("retry-after", "retry-after-ms", "x-should-retry")


async def post(
    client: Pool,
    cfg: ProviderConfig,
    url: str,
    payload: bytes,
    headers: dict[str, str],
    timeouts: Timeouts | None = None,
) -> Response:
    """POST and wait for the response headers, within ``first_byte``.
    ``timeouts`` (a call's, see ``Call.timeouts``) replaces the provider's.

    Each timeout means one thing, independently: ``connect`` the making of
    a new connection, ``first_byte`` the wait for the answer to begin,
    ``idle`` each gap once it has, ``total`` the whole request. The client
    never follows a redirect: it would carry the prompt and the provider's
    credential (api-key, x-api-key, x-goog-api-key, extra headers) to
    whatever host the Location names."""
    t = timeouts or cfg.timeouts
    try:
        resp = await client.post(url, payload, headers, t)
    except TimedOut as exc:
        waited = t.connect if exc.which == "connect" else min(t.first_byte, t.total)
        raise UpstreamTimeout(
            f"provider '{cfg.name}' did not answer within {waited:.3g}s"
        ) from None
    except ConnectFailed:
        raise UpstreamConnectError(f"provider '{cfg.name}' is unreachable") from None
    except Undecodable as exc:
        raise _undecodable(cfg, exc) from None
    except Broken:
        raise UpstreamUnavailable(
            f"provider '{cfg.name}' closed the connection before answering"
        ) from None
    if 300 <= resp.status < 400:
        resp.close()
        raise UpstreamRedirect(
            f"provider '{cfg.name}' answered with a redirect (HTTP {resp.status}); "
            "redirects are not followed: set its base_url to the final address"
        )
    return resp


async def read_body(resp: Response, cfg: ProviderConfig, timeouts: Timeouts | None = None) -> bytes:
    """The whole body of a response ``post`` returned (its connection goes
    back to the pool as the last byte arrives). Bounded by the request's
    timeouts: the first bytes by ``first_byte``, each gap after by
    ``idle``, the whole by ``total``."""
    try:
        return await resp.read()
    except TimedOut as exc:
        raise _timed_out(exc, cfg, timeouts or cfg.timeouts, "sending its response") from None
    except Undecodable as exc:
        raise _undecodable(cfg, exc) from None
    except Failure:
        raise UpstreamUnavailable(f"provider '{cfg.name}' broke off its response") from None
    finally:
        resp.close()  # nothing if it was read to its end; else its connection goes


async def iter_body(
    resp: Response, cfg: ProviderConfig, timeouts: Timeouts | None = None
) -> AsyncIterator[bytes]:
    """The raw body in arrival order, bounded as ``read_body`` is
    (``timeouts``, the call's: for the messages)."""
    try:
        while chunk := await resp.readany():
            yield chunk
    except TimedOut as exc:
        raise _timed_out(exc, cfg, timeouts or cfg.timeouts, "mid-stream") from None
    except Failure:
        raise UpstreamStreamBroken(f"provider '{cfg.name}' broke off the stream") from None


class EventBody:
    """An SSE response body read as whole events, one upstream read at a
    time: the one loop a stream's bytes go through (no generator layers).

    Read (``read``) or pushed (``pushed``): the same events either way, the
    same bounds (the response's own timer: ``h1.Response``), the same
    errors, raised by ``read``.
    """

    __slots__ = (
        "_cfg",
        "_check",
        "_deliver",
        "_pushing",
        "_resp",
        "_split",
        "_timeouts",
        "pending",
    )

    def __init__(
        self,
        resp: Response,
        cfg: ProviderConfig,
        timeouts: Timeouts | None,
        check: Callable[[bytes], bytes] | None = None,
    ) -> None:
        """``check``: given each read's whole events, returns what to pass
        on, or raises a gateway error (a provider's error event)."""
        self._resp = resp
        self._cfg, self._timeouts, self._check = cfg, timeouts, check
        self._split = EventSplitter()
        self.pending: GatewayError | None = None  # raised by the next read (``check`` sets it)
        self._pushing: asyncio.Future[None] | None = None  # set while ``pushed`` runs
        self._deliver: Callable[[bytes], bool] | None = None

    async def read(self) -> bytes:
        """The whole events of the next upstream read(s), as one bytes;
        b"" at the end of the stream."""
        if self.pending is not None:
            raise self.pending
        resp, split = self._resp, self._split
        while True:
            try:
                chunk = await resp.readany()
            except TimedOut as exc:
                self.close()
                raise _timed_out(
                    exc, self._cfg, self._timeouts or self._cfg.timeouts, "mid-stream"
                ) from None
            except Failure:
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
            events = split.feed(chunk)
            if events:
                return self._check(events) if self._check is not None else events

    async def pushed(self, deliver: Callable[[bytes], bool]) -> None:
        """Hand the whole events of each upstream read to ``deliver`` from
        the connection's own data callback, as ``read`` would return them,
        until that can no longer be done; then return, and ``read`` takes
        over (it sees the end, the error or the bytes left). Per read: no
        future, no task wake-up, no coroutine frames.

        ``deliver`` returns False to stop (its client is not taking bytes):
        the provider's socket is no longer read until the next ``read``, so
        a slow client slows the provider. An exception it raises is raised
        here. A provider's error event, a timeout, a reset or the end stop
        the pushing; the next ``read`` raises or returns them, so the guard
        reports them to the breaker as before. With body bytes already
        buffered (``read`` takes those first), this returns at once."""
        resp = self._resp
        if not resp.pushable or self.pending is not None:
            return
        self._pushing = waiter = asyncio.get_running_loop().create_future()
        self._deliver = deliver
        resp.sink, resp.sink_end = self._take, self._stop
        try:
            await waiter
        finally:
            resp.sink = resp.sink_end = None
            self._pushing = self._deliver = None

    def _take(self, data: bytes) -> None:
        """One socket read's body bytes while pushing (``h1.Response.sink``)."""
        if self._pushing is None:
            return
        try:
            events = self._split.feed(data)
            if events and self._check is not None:
                events = self._check(events)
            if events and not self._deliver(events):  # type: ignore[misc]
                self._resp.pause()
                self._stop()
        except GatewayError as exc:  # the provider's error event: the guard's to report
            self.pending = exc
        except Exception as exc:  # noqa: BLE001 - raised in the relay task, where read would
            # have raised it (the client gone): a callback must not throw into the protocol
            self._resp.pause()
            self._stop(exc)
            return
        if self.pending is not None:
            self._stop()

    def _stop(self, exc: BaseException | None = None) -> None:
        resp = self._resp
        resp.sink = resp.sink_end = None
        waiter, self._pushing = self._pushing, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    def close(self) -> None:
        if self._pushing is not None:
            self._stop()


def _timed_out(exc: TimedOut, cfg: ProviderConfig, t: Timeouts, what: str) -> UpstreamTimeout:
    if exc.which == "total":
        return UpstreamTimeout(f"provider '{cfg.name}' exceeded its total time of {t.total:.3g}s")
    if exc.which == "first_byte":  # headers, then nothing: the answer never began
        return UpstreamTimeout(f"provider '{cfg.name}' did not answer within {t.first_byte:.3g}s")
    return UpstreamTimeout(f"provider '{cfg.name}' stalled for more than {t.idle:g}s {what}")


def _undecodable(cfg: ProviderConfig, exc: Undecodable) -> UpstreamUnavailable:
    return UpstreamUnavailable(
        f"provider '{cfg.name}' answered in a Content-Encoding the gateway cannot decode "
        f"({exc}); only gzip and deflate are"
    )


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
