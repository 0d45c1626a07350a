"""The tenant event log: durable in Postgres, live through LISTEN/NOTIFY.

``EventLog.publish`` (the ``proxy.core.events.EventSink`` the job workers
are handed) writes one ``tenant_events`` row, queues its webhook deliveries
and sends ``NOTIFY tollway_events, '<tenant>:<id>'``, all in one
transaction: an event is stored, due to every endpoint that wants it, and
announced, or none of these.

Why LISTEN/NOTIFY: the log is already in Postgres, every worker of every
instance already talks to it, and a notification is sent only when the
transaction commits, so a listener is never told of an event it cannot yet
read. No broker to run, and nothing is lost when one is down: the
notification is only a wake-up. The listening worker reads the rows after
the last id it handed out, so an event it was not told of (its listening
connection dropped and came back) still arrives with the next one, or with
the catch-up read made after every reconnect.

Ids are the resume cursor. One tenant's events are written under a
transaction-scoped advisory lock on the tenant, so within a tenant they
commit in id order: once a reader has seen id N, no event of that tenant
with a smaller id can appear later. That is what makes "replay after the
cursor, then follow live" gapless.

Subscribers (the WebSocket streams of this worker) get events through a
bounded queue; one that falls behind is marked ``overflowed`` and dropped,
never buffered without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from proxy.core.tasks import TaskGroup
from proxy.stores import pgdsn
from proxy.stores.pgwait import UNAVAILABLE, DatabaseDown

log = logging.getLogger("tollway.events")

CHANNEL = "tollway_events"
_LOCK_CLASS = 0x7E7E  # advisory lock class of "one tenant's events", with the tenant in key 2
_PAGE = 500
_RECONNECT_S = 1.0
_DOWN_OR_SLOW: tuple[type[BaseException], ...] = (*UNAVAILABLE, TimeoutError)

# The types a webhook may ask for: OpenAI's webhook event names for batches.
# Progress events (``batch.in_progress``, ``batch.progress``) are for the
# stream only.
WEBHOOK_TYPES = ("batch.completed", "batch.failed", "batch.expired", "batch.cancelled")


@dataclass(frozen=True, slots=True)
class Event:
    id: int  # the cursor
    tenant_id: int
    event_id: str  # evt_...
    type: str
    data: dict[str, Any]
    created_at: datetime

    def message(self) -> dict[str, Any]:
        """What a ``GET /v1/events`` client gets for it."""
        return {
            "id": self.id,
            "event_id": self.event_id,
            "type": self.type,
            "created_at": int(self.created_at.timestamp()),
            "data": self.data,
        }


def _event(row: asyncpg.Record) -> Event:
    data = row["data"]
    return Event(
        row["id"],
        row["tenant_id"],
        row["event_id"],
        row["type"],
        orjson.loads(data) if isinstance(data, str) else data,
        row["created_at"],
    )


def _setter(flag: asyncio.Event) -> Callable[[object], None]:
    return lambda _conn: flag.set()


_COLUMNS = "id, tenant_id, event_id, type, data, created_at"


@dataclass(eq=False, slots=True)
class Subscription:
    """One live reader of one tenant's events (a WebSocket stream)."""

    tenant_id: int
    queue: asyncio.Queue[Event]
    overflowed: bool = False  # the reader fell a whole queue behind
    ended: bool = False  # the log is closing, or the reader is gone
    # Set on every change above: an event queued, an overflow, the end.
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, event: Event) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
        self.wake.set()

    def end(self) -> None:
        self.ended = True
        self.wake.set()

    async def next(self) -> Event | None:
        """The next event; None once it overflowed or ended."""
        while not (self.overflowed or self.ended):
            if not self.queue.empty():
                return self.queue.get_nowait()
            self.wake.clear()
            await self.wake.wait()
        return None


class EventLog:
    """The durable log and this worker's live fan-out of it."""

    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self.pool = pool
        self._dsn = dsn
        self._subs: dict[int, set[Subscription]] = {}
        self._last: dict[int, int] = {}  # per subscribed tenant: the last id fanned out
        self._dirty: set[int] = set()
        self._wake = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        # Called on every notification (the webhook deliverer's wake-up).
        self.on_notify: list[Callable[[], None]] = []
        self.listening = asyncio.Event()  # set while the LISTEN connection is up
        self.published: dict[str, int] = {}  # events this worker wrote, by type (metrics)

    # -- writing -----------------------------------------------------------

    async def publish(self, tenant_id: int, type: str, data: dict[str, Any]) -> None:
        await self.record(tenant_id, type, data)

    async def record(self, tenant_id: int, type: str, data: dict[str, Any]) -> Event:
        """``publish``, returning the stored event."""
        body = orjson.dumps(data).decode()
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1, ($2::bigint % 2147483647)::int)",
                _LOCK_CLASS,
                tenant_id,
            )
            row = await conn.fetchrow(
                "INSERT INTO tenant_events (tenant_id, event_id, type, data)"
                f" VALUES ($1, $2, $3, $4::jsonb) RETURNING {_COLUMNS}",
                tenant_id,
                f"evt_{secrets.token_hex(12)}",
                type,
                body,
            )
            assert row is not None
            await conn.execute(
                "INSERT INTO webhook_deliveries (event_id, endpoint_id)"
                " SELECT $1, e.id FROM webhook_endpoints e"
                " WHERE e.tenant_id = $2 AND $3 = ANY (e.event_types)",
                row["id"],
                tenant_id,
                type,
            )
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{tenant_id}:{row['id']}")
        self.published[type] = self.published.get(type, 0) + 1
        return _event(row)

    # -- reading -----------------------------------------------------------

    async def after(self, tenant_id: int, cursor: int, limit: int = _PAGE) -> list[Event]:
        """The tenant's stored events with ids above ``cursor``, oldest first."""
        try:
            rows = await self.pool.fetch(
                f"SELECT {_COLUMNS} FROM tenant_events WHERE tenant_id = $1 AND id > $2"
                " ORDER BY id LIMIT $3",
                tenant_id,
                cursor,
                limit,
            )
        except UNAVAILABLE as exc:
            raise DatabaseDown(f"reading events: {type(exc).__name__}") from None
        return [_event(r) for r in rows]

    async def latest(self, tenant_id: int) -> int:
        try:
            value = await self.pool.fetchval(
                "SELECT coalesce(max(id), 0) FROM tenant_events WHERE tenant_id = $1", tenant_id
            )
        except UNAVAILABLE as exc:
            raise DatabaseDown(f"reading events: {type(exc).__name__}") from None
        return int(value)

    # -- live --------------------------------------------------------------

    async def subscribe(self, tenant_id: int, maxsize: int) -> Subscription:
        """Register first, replay second: every event after the moment this
        returns reaches the queue (maybe also the replay; dedupe by id)."""
        sub = Subscription(tenant_id, asyncio.Queue(maxsize))
        self._subs.setdefault(tenant_id, set()).add(sub)
        if tenant_id not in self._last:
            try:
                latest = await self.latest(tenant_id)
            except DatabaseDown:
                self.unsubscribe(sub)
                raise
            self._last.setdefault(tenant_id, latest)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.tenant_id)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self._subs[sub.tenant_id]
            self._last.pop(sub.tenant_id, None)

    def end_all(self) -> None:
        """Every subscription ends (the worker is shutting down)."""
        for subs in self._subs.values():
            for sub in subs:
                sub.end()

    def subscribers(self, tenant_id: int) -> int:
        return len(self._subs.get(tenant_id, ()))

    def open_streams(self) -> int:
        return sum(len(subs) for subs in self._subs.values())

    def _notified(self, conn: object, pid: int, channel: str, payload: str) -> None:
        tenant, _, _ = payload.partition(":")
        with contextlib.suppress(ValueError):
            tid = int(tenant)
            if tid in self._subs:
                self._dirty.add(tid)
                self._wake.set()
        for wake in self.on_notify:
            wake()

    def start(self, tasks: TaskGroup) -> None:
        self._tasks.append(tasks.spawn(self._listen(), name="events-listen"))
        self._tasks.append(tasks.spawn(self._pump(), name="events-pump"))

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.end_all()
        if self._listener is not None and not self._listener.is_closed():
            await self._listener.close()

    async def _listen(self) -> None:
        """Keep one dedicated connection LISTENing; after each (re)connect,
        every subscribed tenant is read again from its last id, which covers
        whatever was announced while the connection was down."""
        while not self._closed:
            try:
                conn = await asyncpg.connect(**pgdsn.options(self._dsn), timeout=5)
            except UNAVAILABLE as exc:
                log.warning("events: cannot open the LISTEN connection (%s); retrying", exc)
                await asyncio.sleep(_RECONNECT_S)
                continue
            lost = asyncio.Event()
            conn.add_termination_listener(_setter(lost))
            self._listener = conn
            try:
                await conn.add_listener(CHANNEL, self._notified)
                self.listening.set()
                self._dirty.update(self._subs)
                self._wake.set()
                for wake in self.on_notify:
                    wake()
                while not lost.is_set():
                    # A connection that died without a FIN is found by asking.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(15):
                            await lost.wait()
                    if not lost.is_set():
                        try:
                            async with asyncio.timeout(5):
                                await conn.execute("SELECT 1")
                        except _DOWN_OR_SLOW:
                            break
            except UNAVAILABLE as exc:
                log.warning("events: LISTEN connection failed (%s); reconnecting", exc)
            finally:
                self.listening.clear()
                conn.terminate()
            await asyncio.sleep(_RECONNECT_S)

    async def _pump(self) -> None:
        """Read each woken tenant's new rows once and hand them to its subscribers."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            dirty, self._dirty = self._dirty, set()
            for tid in dirty:
                try:
                    await self._fan_out(tid)
                except DatabaseDown as exc:
                    log.warning("events: reading tenant %d's events failed (%s)", tid, exc)
                    self._dirty.add(tid)
            if self._dirty:
                await asyncio.sleep(_RECONNECT_S)
                self._wake.set()

    async def _fan_out(self, tid: int) -> None:
        while tid in self._last:
            events = await self.after(tid, self._last[tid])
            if not events or tid not in self._last:
                return
            self._last[tid] = events[-1].id
            for sub in list(self._subs.get(tid, ())):
                for event in events:
                    sub.offer(event)
            if len(events) < _PAGE:
                return

    # -- retention ---------------------------------------------------------

    async def sweep(self, retention_s: float, batch: int = 5000) -> int:
        """Delete events older than ``retention_s`` (their deliveries go with
        them); in batches, so no statement holds many rows locked."""
        total = 0
        while True:
            status = await self.pool.execute(
                "DELETE FROM tenant_events WHERE id IN (SELECT id FROM tenant_events"
                " WHERE created_at < now() - make_interval(secs => $1)"
                " ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)",
                float(retention_s),
                batch,
            )
            n = int(status.split()[-1])
            total += n
            if n < batch:
                return total
