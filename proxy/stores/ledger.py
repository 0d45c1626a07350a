"""Usage events, written in batches off the request path, never lost or doubled.

Settled rows are queued in memory and flushed in one transaction once the
oldest has waited ``flush_interval_ms`` (100 by default; an idle worker's
flusher sleeps until a row comes): the events are inserted ``ON CONFLICT DO NOTHING`` (unique
by period and an event id the server draws at admission, never the client's
``x-request-id``, which a client may reuse), and only the rows actually inserted move quota
counters and leases, so a retried or replayed batch never double-bills.

If Postgres is unreachable the batch is appended to a local spool file
(fsynced JSON lines) and replayed when Postgres answers again. A row that
Postgres refuses for its content is a different failure: it would fail every
retry, so it is isolated (the batch is split until the refused rows stand
alone), kept in the dead-letter file (``proxy.stores.dead_letter``), and the rest
of its batch is written; it never sends a batch to the spool. The rows a
hard crash loses from memory are billed from the request journal
(``proxy.stores.journal``) as interrupted; leases of
a worker that stops heartbeating are released by any other worker's sweep
after ``lease_ttl_s`` (its unsettled reservations are released, not
charged; spooled usage of that worker is still charged when replayed).

The interval is a trade: each batch costs Postgres ~1 ms of CPU before its
first row (an eleven-part statement and its follow-ups; ``bench/usage_write.py``),
so at 20 ms a worker busy or not cost the database a fixed ~50 ms of CPU
a second, and each batch's wake-ups shared the gateway's cores; a row
waiting 0.1 s delays only reports and budget alerts, never admission (the
leases count it from the moment it was admitted).

This module is the queue and its flusher; the row, its SQL and the batch's
transaction are ``proxy.stores.usage_batch``, the spool file
``proxy.stores.spool``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import asyncpg

from proxy.stores.dead_letter import DeadLetters
from proxy.stores.pgwait import UNAVAILABLE
from proxy.stores.spool import Spool
from proxy.stores.usage_batch import (
    _CHUNK,
    COLUMNS,
    Crossing,
    Refused,
    UsageRow,
    write_isolating,
)

# The names this module always offered: the row, its columns, the spool.
__all__ = ["COLUMNS", "Crossing", "Ledger", "Spool", "UsageRow"]

log = logging.getLogger("tollway.ledger")


class Ledger:
    """Queues rows, flushes them in batches, spools what fails, replays it."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        spool: Spool,
        worker_id: str,
        flush_interval: float,
        lease_ttl: float,
        on_leases: Callable[[set[tuple[int, date]], float], None] | None = None,
    ) -> None:
        self._on_leases = on_leases
        self._pool = pool
        self.spool = spool
        self.worker_id = worker_id
        self._interval = flush_interval
        self._lease_ttl = lease_ttl
        self._queue: list[UsageRow] = []
        # Called with each batch once it is in Postgres or the spool (the journal closes it).
        self.on_durable: Callable[[list[UsageRow]], None] | None = None
        # Called with the budgets that crossed an alert threshold, once committed.
        self.on_alerts: Callable[[list[Crossing]], None] | None = None
        self.on_budget_leases: Callable[[set[tuple[str, str, date]], float], None] | None = None
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._rows = asyncio.Event()  # the queue has rows (or a stop is asked)
        self.healthy = True
        self.written = 0
        self.dead = DeadLetters(spool.path.parent, worker_id)
        # For the metrics: rows not yet in Postgres, and since when (monotonic).
        self._spooled = spool.depth()
        self._in_flight = 0
        self._since: dict[str, float] = {"spool": time.monotonic()} if self._spooled else {}

    def add(self, row: UsageRow) -> None:
        if not self._queue:
            self._since["queue"] = time.monotonic()
            self._rows.set()
        self._queue.append(row)

    @property
    def dead_lettered(self) -> int:
        """Rows refused by Postgres and kept in the dead-letter file, so far."""
        return self.dead.count

    def pending(self) -> int:
        """Usage rows waiting for Postgres: queued, being written, spooled."""
        return len(self._queue) + self._in_flight + self._spooled

    def lag(self) -> float:
        """Age in seconds of the oldest row not yet settled in Postgres."""
        return time.monotonic() - min(self._since.values()) if self._since else 0.0

    async def run(self) -> None:
        """The flusher loop; one per process. ``stop`` it, then call ``close``.

        Stopped by an event, not a cancel: a cancel landing inside a batch
        write would leave the batch neither in Postgres nor in the spool."""
        beat_at = 0.0  # monotonic: when the leases' next heartbeat is due
        while not self._stopping.is_set():
            await self._due(beat_at)
            await self.flush()
            if time.monotonic() >= beat_at:
                beat_at = time.monotonic() + self._lease_ttl / 4
                await self._heartbeat_and_sweep()

    async def _due(self, beat_at: float) -> None:
        """Wait until the oldest queued row has waited the interval (or the
        spool is due another try), or, with nothing to write, until a row
        comes or the leases' heartbeat is due at ``beat_at`` (monotonic); a
        stop ends any wait."""
        if not self._queue and not self._spooled:
            self._rows.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, beat_at - time.monotonic())):
                    await self._rows.wait()
            if not self._queue:
                return  # a heartbeat, or a stop
        since = self._since.get("queue")  # set while the queue has rows
        wait = self._interval if since is None else since + self._interval - time.monotonic()
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._stopping.wait()

    async def reachable(self) -> bool:
        """Whether Postgres answers a trivial query within a second (``/readyz``).

        Tried twice: after a Postgres restart the pool may hand out a
        connection that died with the old server (it is dropped on release),
        and that says nothing about the server now."""
        try:
            async with asyncio.timeout(1.0):
                for attempt in (1, 2):
                    try:
                        await self._pool.fetchval("SELECT 1")
                        return True
                    except (OSError, asyncpg.InterfaceError):
                        if attempt == 2:
                            raise
        except UNAVAILABLE:
            pass
        return False

    def stop(self) -> None:
        """Let ``run`` finish its current flush and return."""
        self._stopping.set()
        self._rows.set()

    async def flush(self) -> None:
        # One flush at a time: a replay clearing the spool must not race a
        # failing batch appending to it.
        async with self._lock:
            await self._flush()

    async def _flush(self) -> None:
        if self.spool.path.exists():
            await self._replay()
        if not self._queue:
            return
        batch, self._queue = self._queue, []
        since = self._since.pop("queue", time.monotonic())
        self._since["batch"], self._in_flight = since, len(batch)
        try:
            await self._write(batch)
            self._set_healthy(True)
        except Exception as exc:  # noqa: BLE001 - the database is down or busy: spool the rows
            self._set_healthy(False, exc)
            self.spool.append(batch)
            self._spooled += len(batch)
            self._since["spool"] = min(since, self._since.get("spool", since))
        except asyncio.CancelledError:
            # Back in the queue for the next flush; the write may have landed
            # anyway, which the (period, event_id) key makes harmless.
            self._queue[:0] = batch
            self._since["queue"] = min(since, self._since.get("queue", since))
            raise
        finally:
            self._since.pop("batch", None)
            self._in_flight = 0
        if self.on_durable is not None:
            self.on_durable(batch)

    async def _write(self, rows: list[UsageRow]) -> int:
        """Write ``rows`` in chunks, dead-lettering the refused ones; the
        number written. Raises when the database is down or busy: then
        nothing is dead-lettered, and all the rows are still the caller's."""
        refused: Refused = []
        alerts: list[Crossing] = []
        try:
            for i in range(0, len(rows), _CHUNK):
                await write_isolating(self._pool, rows[i : i + _CHUNK], refused, alerts)
        finally:
            if alerts and self.on_alerts is not None:
                self.on_alerts(alerts)
        self.dead.keep(refused)
        self.written += len(rows) - len(refused)
        return len(rows) - len(refused)

    async def _replay(self) -> bool:
        rows = self.spool.read()
        try:
            await self._write(rows)
        except Exception as exc:  # noqa: BLE001 - keep the spool, try again next flush
            self._set_healthy(False, exc)
            return False
        self.spool.clear()
        self._spooled = 0
        self._since.pop("spool", None)
        log.info("replayed %d spooled usage rows", len(rows))
        self._set_healthy(True)
        return True

    def _set_healthy(self, ok: bool, exc: BaseException | None = None) -> None:
        if ok != self.healthy:
            if ok:
                log.warning("billing database reachable again")
            else:
                log.error("billing database unreachable, spooling usage: %s", type(exc).__name__)
        self.healthy = ok

    async def _heartbeat_and_sweep(self) -> None:
        checked_at = time.monotonic()
        try:
            alive = await self._pool.fetch(
                "UPDATE quota_leases SET heartbeat_at = now() WHERE worker_id = $1"
                " RETURNING tenant_id, period",
                self.worker_id,
            )
            if self._on_leases is not None:
                # Leases swept while we were cut off are no longer ours to spend.
                self._on_leases({(r["tenant_id"], r["period"]) for r in alive}, checked_at)
            await self._pool.execute(
                "DELETE FROM quota_leases WHERE heartbeat_at < now() - make_interval(secs => $1)",
                self._lease_ttl,
            )
            held = await self._pool.fetch(
                "UPDATE budget_leases SET heartbeat_at = now() WHERE worker_id = $1"
                " RETURNING subject, span, period",
                self.worker_id,
            )
            if self.on_budget_leases is not None:
                self.on_budget_leases(
                    {(r["subject"], r["span"], r["period"]) for r in held}, checked_at
                )
            await self._pool.execute(
                "DELETE FROM budget_leases WHERE heartbeat_at < now() - make_interval(secs => $1)",
                self._lease_ttl,
            )
        except Exception:  # noqa: BLE001 - a missed heartbeat is retried next round
            pass

    async def replay_orphans(self, directory: Path) -> int:
        """Write the spools left by dead workers (crashes), then remove them."""
        total = 0
        for path in sorted(directory.glob("spool-*.jsonl")):  # noqa: ASYNC240 - once, at start
            if path == self.spool.path:
                continue
            try:
                orphan = Spool(path)
            except RuntimeError:
                continue  # its worker is alive
            try:
                total += await self._write(orphan.read())
            except UNAVAILABLE:
                orphan.release()
                continue
            orphan.clear()
            path.with_suffix(".lock").unlink(missing_ok=True)
            orphan.release()
        if total:
            log.info("replayed %d usage rows spooled by earlier processes", total)
        return total

    async def close(self) -> None:
        """Final flush, then hand this worker's unused leases back."""
        await self.flush()
        try:
            await self._pool.execute(
                "DELETE FROM quota_leases WHERE worker_id = $1", self.worker_id
            )
            await self._pool.execute(
                "DELETE FROM budget_leases WHERE worker_id = $1", self.worker_id
            )
        except UNAVAILABLE:
            log.warning("could not return leases; the sweeper will release them")
        if self.spool.depth() == 0:
            self.spool.path.with_suffix(".lock").unlink(missing_ok=True)
        self.spool.release()
