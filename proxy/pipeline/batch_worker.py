"""The batch worker: one per batch process of ``tollway serve --workers N``
(``batches.workers``, niced; ``proxy.cli.supervisor``), or one in a single
``tollway serve`` (or in each HTTP worker with ``batches.workers: 0``).

It leases pending lines from the Postgres queue (``proxy.stores.batch_queue``),
runs each through the pipeline as its batch's creator key
(``proxy.pipeline.batch_line``), and writes its output or error line. The
limits (``batches:`` in the YAML) keep a big batch from starving
interactive traffic: at most ``worker_concurrency`` lines run in this
process (``busy_concurrency`` while interactive requests are in flight:
here, or in the instance's HTTP workers for a batch process),
``batch_concurrency`` per batch and ``tenant_concurrency`` per tenant across
the fleet.

A line refused for quota or rate limits (429) or by a busy or briefly
unavailable gateway (503) is not an error: it goes back to the queue and
waits (``quota_retry_s``, or the refusal's ``retry-after``), so an exhausted
quota pauses a batch instead of failing its remaining lines. The key is
looked up again before each line (cached a few seconds): a revoked or
expired key fails what is left of the batch. Postgres going away stops the
worker's polling, not the worker: it retries, and the lines it could not
record run again once their lease runs out (billed once: their usage row's
key is the batch and ``custom_id``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from proxy.config.batches import BatchPolicy
from proxy.core import batch_input
from proxy.core.errors import GatewayError, ProviderNotConfigured, RateLimited, ServiceUnavailable
from proxy.core.events import EventSink, NoEvents
from proxy.core.principal import Principal
from proxy.pipeline.batch_line import serve_line
from proxy.pipeline.runtime import Runtime
from proxy.stages.auth import budget_overrides
from proxy.stores.batch_queue import Leased
from proxy.stores.batch_rows import line_event_id, line_request_id
from proxy.stores.batches import BatchStore
from proxy.stores.pgwait import UNAVAILABLE, DatabaseDown

log = logging.getLogger("tollway.batches")

# Postgres cannot answer: the queue waits for it (pgwait's mapping, plus its own).
_DOWN: tuple[type[BaseException], ...] = (DatabaseDown, *UNAVAILABLE)
KEY_TTL_S = 5.0  # how long a looked-up creator key is trusted before the next look-up
PROGRESS_EVERY_S = 1.0  # batch.progress events per batch, at most one per this
RESULTS_RETRY_S = 1.0  # results the database refused are written again after this
HOUSEKEEPING_S = 2.0  # the queue metrics and the file retention sweep, once per this


class BatchWorker:
    def __init__(
        self,
        store: BatchStore,
        rt: Runtime,
        policy: Callable[[], BatchPolicy],
        events: EventSink | None = None,
        on_line: Callable[[str], None] = lambda result: None,
        on_queue: Callable[[int, float], None] = lambda depth, oldest_s: None,
        busy: Callable[[], bool] | None = None,
    ) -> None:
        self.store, self.rt, self.policy = store, rt, policy
        self.events: EventSink = events or NoEvents()
        self.on_line = on_line  # "completed", "failed" or "deferred": the metrics
        self.on_queue = on_queue  # queue depth and oldest pending age: the metrics
        # Interactive requests in flight: here by default; a batch process
        # is told about its instance's HTTP workers instead.
        self.busy = busy or (lambda: self.rt.lifecycle.requests > 0)
        self._housekept = self._swept = 0.0
        self._results: list[tuple[Leased, bool, dict[str, Any]]] = []  # done, not yet written
        self._writer: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._keys: dict[str, tuple[float, Principal | None]] = {}
        self._progress: dict[str, float] = {}
        self._down_logged = 0.0
        self._next_busy_start = 0.0  # while busy, no line starts before this (loop time)
        self._pace_timer: asyncio.TimerHandle | None = None

    def wake(self) -> None:
        """Look for lines now (a batch was just created here)."""
        self._wake.set()

    @property
    def running(self) -> int:
        return len(self._running)

    async def run(self) -> None:
        while not self._stopping:
            policy = self.policy()
            # Cleared before the tick: a line ending during it wakes the next one.
            self._wake.clear()
            await self._tick(policy)
            try:
                await asyncio.wait_for(self._wake.wait(), policy.poll_interval_s)
            except TimeoutError:
                pass

    async def stop(self, grace: float) -> None:
        """Stop leasing; give the running lines ``grace`` seconds, then give
        them back to the queue for another worker."""
        self._stopping = True
        self._wake.set()
        if self._running:
            _, pending = await asyncio.wait(set(self._running), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._writer is not None:
            await asyncio.wait([self._writer])  # the results of the lines that finished

    async def _tick(self, policy: BatchPolicy) -> None:
        """Housekeeping, the sweep and the claim, each on its own: one that
        fails or outlasts the pool's command timeout is logged and tried
        again at its next turn, and never keeps the others (the claim above
        all) from running. A failing sweep used to end the tick before its
        claim, so a batch that could not be ended stopped every line."""
        now = time.monotonic()
        if now - self._housekept >= HOUSEKEEPING_S:
            self._housekept = now
            await self._step("queue metrics", self._housekeep)
        if now - self._swept >= policy.poll_interval_s:
            # Not on every wake (a line done wakes it): ending batches can wait a poll.
            self._swept = now
            await self._step("sweep", self._sweep)
        await self._step("claim", lambda: self._claim(policy))

    async def _step(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        try:
            await step()
        except _DOWN as exc:
            if time.monotonic() - self._down_logged > 5:
                self._down_logged = time.monotonic()
                log.warning(
                    "batch queue unreachable in %s (%s); retrying", what, type(exc).__name__
                )
        except Exception:  # a bug in one step must not stop the worker for good
            log.exception("batch queue %s failed; retrying", what)

    async def _housekeep(self) -> None:
        self.on_queue(*await self.store.queue())
        await self.store.expire_files()

    async def _sweep(self) -> None:
        for ended in await self.store.sweep():
            status = ended.batch["status"]
            log.info("batch %s %s", ended.batch["id"], status)
            await self._publish(ended.tenant_id, f"batch.{status}", ended.batch)

    async def _claim(self, policy: BatchPolicy) -> None:
        # Interactive requests in flight: the lines yield most of the room to them.
        busy = self.busy()
        most = (
            min(policy.busy_concurrency, policy.worker_concurrency)
            if busy
            else policy.worker_concurrency
        )
        free = most - len(self._running)
        if busy and free > 0:
            free = self._paced(free, policy.busy_lines_per_s)
        # Lease in handfuls, not one line per line done: a claim is a few queries.
        if not policy.enabled or free < max(1, most // 4 if not busy else 1) or self._stopping:
            return
        leased = await self.store.claim(
            free, policy.batch_concurrency, policy.tenant_concurrency, policy.lease_s
        )
        for line in leased:
            task = asyncio.get_running_loop().create_task(
                self._line(line, policy), name=f"batch-line {line.batch_id}:{line.line}"
            )
            self._running.add(task)
            task.add_done_callback(self._done)

    def _paced(self, free: int, per_s: float) -> int:
        """How many lines may start now at ``per_s`` lines a second: one
        line each ``1/per_s`` seconds, with no burst saved up while idle; a
        wake-up is set for the next start."""
        loop = asyncio.get_running_loop()
        now, gap = loop.time(), 1.0 / per_s
        if now < self._next_busy_start:
            if self._pace_timer is None or self._pace_timer.cancelled():
                self._pace_timer = loop.call_at(self._next_busy_start, self._paced_wake)
            return 0
        starts = min(free, max(1, int(per_s * 0.05)))  # a few at once above 20 lines/s
        self._next_busy_start = now + starts * gap
        return starts

    def _paced_wake(self) -> None:
        self._pace_timer = None
        self._wake.set()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._wake.set()  # room for another line

    async def _line(self, line: Leased, policy: BatchPolicy) -> None:
        try:
            if await self._execute(line, policy) == "deferred":
                self.on_line("deferred")
        except asyncio.CancelledError:
            await self._give_back(line)
            raise
        except _DOWN as exc:
            # Its result is lost with the database; its lease runs out and it runs again.
            log.warning("batch line %s:%d not recorded (%s)", line.batch_id, line.line, exc)
        except Exception:
            log.exception("batch line %s:%d failed", line.batch_id, line.line)

    async def _give_back(self, line: Leased) -> None:
        try:
            await asyncio.shield(self.store.defer(line, 0))
        except _DOWN:
            pass  # its lease runs out instead

    async def _execute(self, line: Leased, policy: BatchPolicy) -> str:
        request_id = line_request_id(line.batch_id, line.line)
        who = await self._principal(line.key_id)
        if who is None:
            message = "The batch's API key was revoked or has expired."
            await self.store.fail_batch(line.batch_id, "invalid_api_key", message)
            error = {"code": "invalid_api_key", "message": message}
            await self._record(line, False, _result(line, request_id, None, error))
            return "failed"
        event_id = line_event_id(line.batch_id, line.custom_id)
        # Run before (its worker died after the provider answered)? Then its
        # row may be in last month's partition, where this run's must go too.
        billed_in = await self.store.billed_in(event_id) if line.attempts > 1 else None
        try:
            answer = await serve_line(
                self.rt,
                batch_input.PIPELINE[line.endpoint],
                line.body,
                who,
                request_id,
                event_id,
                billed_in,
            )
        except GatewayError as exc:
            if _waits(exc):
                await self.store.defer(line, _retry_after(exc, policy))
                return "deferred"
            response = {"status_code": exc.http_status, "request_id": request_id}
            response["body"] = exc.payload()
            await self._record(line, False, _result(line, request_id, response, None))
            return "failed"
        ok = answer.status < 400
        try:
            body: Any = orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            body = answer.body.decode(errors="replace")
        response = {"status_code": answer.status, "request_id": request_id, "body": body}
        await self._record(line, ok, _result(line, request_id, response, None))
        return "completed" if ok else "failed"

    async def _record(self, line: Leased, ok: bool, result: dict[str, Any]) -> None:
        """Queue the line's result for the next write (``_write``)."""
        self._results.append((line, ok, result))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(
                self._write(), name="batch-results"
            )

    async def _write(self) -> None:
        """Write the queued results, in one statement per round. Each line's
        usage row is made durable first (Postgres, or the ledger's fsynced
        spool): a worker killed in between runs the line again and the row's
        key makes the second row a no-op; the other order could lose the row
        (the line done, its usage only in memory). One ledger flush and one
        write per round, not per line: each is a commit."""
        while self._results:
            done, self._results = self._results, []
            try:
                if self.rt.billing is not None:
                    await self.rt.billing.ledger.flush()
                await self.store.finish(done)
            except _DOWN as exc:
                # Kept and written once the database is back (a stopping worker
                # gives up: the leases run out and the lines run again). A line
                # whose lease ran out meanwhile may have run again elsewhere:
                # the write of a finished line is a no-op, and its usage row's
                # key bills it once.
                log.warning("%d batch results not recorded yet (%s)", len(done), type(exc).__name__)
                if self._stopping:
                    return
                self._results[:0] = done
                await asyncio.sleep(RESULTS_RETRY_S)
            self._wake.set()  # their leases are released: room for more lines
            for outcome in done:
                self.on_line("completed" if outcome[1] else "failed")
            await self._progress_of({(x.tenant_id, x.batch_id) for x, _, _ in done})

    async def _progress_of(self, batches: set[tuple[int, str]]) -> None:
        now = time.monotonic()
        for tenant_id, batch_id in batches:
            if now - self._progress.get(batch_id, 0.0) < PROGRESS_EVERY_S:
                continue
            self._progress[batch_id] = now
            batch = await self.store.get(tenant_id, batch_id)
            if batch is not None and batch["status"] == "in_progress":
                await self._publish(tenant_id, "batch.progress", batch)

    async def _publish(self, tenant_id: int, type: str, batch: dict[str, Any]) -> None:
        try:
            await self.events.publish(tenant_id, type, batch)
        except Exception:  # delivery is another component's; the batch goes on
            log.exception("could not publish %s for %s", type, batch.get("id"))

    async def _principal(self, key_id: str) -> Principal | None:
        now = time.monotonic()
        cached = self._keys.get(key_id)
        if cached is not None and now - cached[0] < KEY_TTL_S:
            return cached[1]
        row = await self.store.key_of(key_id)
        who = None
        if row is not None and row["state"] == "active":
            expires = row["expires_at"]
            if expires is None or expires > datetime.now(UTC):
                who = Principal(
                    key_id=row["id"],
                    key_prefix=row["prefix"],
                    tenant_id=row["tenant_id"],
                    tenant=row["tenant"],
                    tier=row["tier"],
                    expires_at=expires,
                    budgets=budget_overrides(row["tenant_budgets"], row["key_budgets"]),
                )
        self._keys[key_id] = (now, who)
        return who


def _waits(exc: GatewayError) -> bool:
    """Refusals that pass with time (quota, limits, a busy or restarting
    gateway): the line waits for them instead of failing."""
    if isinstance(exc, ProviderNotConfigured):
        return False
    return isinstance(exc, RateLimited | ServiceUnavailable) or exc.http_status in (429, 503)


def _retry_after(exc: GatewayError, policy: BatchPolicy) -> float:
    given = exc.headers.get("retry-after", "")
    if given.isdigit():
        return max(1.0, float(given))
    return policy.quota_retry_s if isinstance(exc, RateLimited) else 2.0


def _result(
    line: Leased, request_id: str, response: dict[str, Any] | None, error: dict[str, Any] | None
) -> dict[str, Any]:
    """OpenAI's batch output line."""
    return {"id": request_id, "custom_id": line.custom_id, "response": response, "error": error}
