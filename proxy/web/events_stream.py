"""``GET /v1/events``: a tenant's job events as a WebSocket, resumable.

The upgrade request passes the gate like every ``/v1`` request (Bearer API
key; a bad one is a 401 before any upgrade). The stream holds only the
key's tenant's events. ``?after=<id>`` (or the ``Last-Event-ID`` header)
is the resume cursor: the stream first sends the stored events after it,
then follows live ones. The live subscription is opened *before* the replay
and live events at or below the last id sent are dropped, so the switch
from replay to live neither loses nor repeats an event.

Each message is one JSON text frame ``{"id", "event_id", "type",
"created_at", "data"}``; ``id`` is the cursor to resume after. The server
pings every ``events.stream.heartbeat_s`` and closes a connection that
does not answer. A client that falls ``send_queue`` events behind is closed
with code 4008 (resume with its last id); at shutdown streams close with
1001 (going away). Open streams are not requests in flight: the drain does
not wait for them.
"""

from __future__ import annotations

import asyncio
import contextlib

import orjson
from aiohttp import WSCloseCode, web

from proxy.core.errors import InvalidRequest, NotFound, RateLimited, ServiceUnavailable
from proxy.core.tasks import TaskGroup
from proxy.pipeline.runtime import PRINCIPAL, REQUEST_ID
from proxy.stores.events import Event, EventLog, Subscription
from proxy.stores.pgwait import DatabaseDown
from proxy.web.events_setup import event_settings
from proxy.web.keys import EVENTS, LIFECYCLE, TASKS

SLOW_CLIENT = 4008  # the send queue filled up: reconnect with ?after=<last id>
_MAX_CURSOR = 2**63 - 1
_CLOSE_WAIT_S = 5.0


def _cursor(request: web.Request) -> int:
    raw = request.query.get("after")
    param = "after"
    if raw is None:
        raw, param = request.headers.get("Last-Event-ID"), "Last-Event-ID"
    if raw is None or raw == "":
        return 0
    if not raw.isdigit() or int(raw) > _MAX_CURSOR:
        raise InvalidRequest(
            f"'{param}' must be an event id (a non-negative integer).", param=param
        )
    return int(raw)


async def stream(request: web.Request) -> web.StreamResponse:
    who = request.get(PRINCIPAL)
    events = request.app.get(EVENTS)
    if who is None or not isinstance(events, EventLog):
        raise NotFound("The events stream needs API keys and a database on this gateway.")
    after = _cursor(request)
    settings = event_settings(request.app).stream
    ws = web.WebSocketResponse(heartbeat=settings.heartbeat_s, max_msg_size=4096)
    if not ws.can_prepare(request).ok:
        raise InvalidRequest("GET /v1/events is a WebSocket: connect with 'Upgrade: websocket'.")
    if events.subscribers(who.tenant_id) >= settings.max_connections_per_tenant:
        raise RateLimited(
            f"Too many open event streams for this tenant (at most"
            f" {settings.max_connections_per_tenant} per gateway worker).",
            code="too_many_streams",
        )
    try:
        sub = await events.subscribe(who.tenant_id, settings.send_queue)
    except DatabaseDown:
        raise ServiceUnavailable("The event log is unreachable; retry shortly.") from None
    ws.headers["x-request-id"] = request[REQUEST_ID]  # as on every other response
    try:
        await ws.prepare(request)
        # A stream is resumable and may stay open for days: the drain does
        # not wait for it (it is closed with 1001 at shutdown instead).
        task = asyncio.current_task()
        if task is not None:
            request.app[LIFECYCLE].leave(task)
        await _serve(ws, events, sub, after, request.app[TASKS])
    finally:
        events.unsubscribe(sub)
    return ws


async def _serve(
    ws: web.WebSocketResponse, events: EventLog, sub: Subscription, after: int, tasks: TaskGroup
) -> None:
    reader = tasks.spawn(_read(ws), name="events-stream-read")
    reader.add_done_callback(lambda _t: sub.end())  # the client left
    try:
        last = after
        while not sub.overflowed:  # the stored events after the cursor
            try:
                page = await events.after(sub.tenant_id, last)
            except DatabaseDown:
                await _close(ws, WSCloseCode.TRY_AGAIN_LATER, "event log unreachable; resume later")
                return
            for event in page:
                if not await _send(ws, event, last):
                    return
                last = event.id
            if not page:
                break
        while (live := await sub.next()) is not None:  # then live ones
            if live.id <= last:
                continue  # already sent by the replay
            if not await _send(ws, live, last):
                return
            last = live.id
        if ws.closed:
            return
        if sub.overflowed:
            await _close(ws, SLOW_CLIENT, f"too slow: resume with ?after={last}")
        else:
            await _close(ws, WSCloseCode.GOING_AWAY, f"going away: resume with ?after={last}")
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def _read(ws: web.WebSocketResponse) -> None:
    """Client frames are not used; reading them answers pings and sees the close."""
    async for _msg in ws:
        pass


async def _send(ws: web.WebSocketResponse, event: Event, last: int) -> bool:
    """False when the client is gone or could not take it in time (``last``:
    the id it has, to resume after)."""
    if ws.closed:
        return False
    try:
        async with asyncio.timeout(_CLOSE_WAIT_S * 2):
            await ws.send_str(orjson.dumps(event.message()).decode())
    except TimeoutError:
        await _close(ws, SLOW_CLIENT, f"too slow: resume with ?after={last}")
        return False
    except (ConnectionError, RuntimeError):
        return False
    return True


async def _close(ws: web.WebSocketResponse, code: int, message: str) -> None:
    with contextlib.suppress(TimeoutError, ConnectionError, RuntimeError):
        async with asyncio.timeout(_CLOSE_WAIT_S):
            await ws.close(code=code, message=message.encode())
