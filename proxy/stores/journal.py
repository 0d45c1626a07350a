"""The request journal: a crash loses at most ~1 s of a stream's usage, never a request.

The ledger's rows live in memory until their batch reaches Postgres or the
spool, and a stream's row only exists once it ends, so a ``kill -9`` would
lose every request in flight, with chunks the provider bills already out.
The journal closes that gap. Each worker appends to its own fsynced file
(``journal-<worker>.jsonl`` beside its spool, flock-owned like it), one line
per event, keyed by the event id the usage row will carry:

- ``o`` (open): the request was admitted; the row's fixed columns;
- ``c`` (checkpoint): the usage delivered so far, for requests still running
  ``CHECKPOINT_S`` after their last note (a stream's tokens so far);
- ``x`` (closed): their usage rows reached Postgres or the spool (the ids
  closed in one interval, in one line; an older version wrote one per id).

Nothing is written on the request path: ``admitted`` (or ``open``) and
``closed`` touch a dict, and the flusher (``run``) writes everything of the
last ``FLUSH_S`` with one append and one fsync (group commit), just after a
ledger batch has landed when one lands in the interval's last ``ALIGN_S`` (or
the ledger's interval, when longer: ``_align_s``). A request that opens and
closes within one interval is never written at all, and costs one tuple: its
``_Entry`` is made at the write, only for the requests still open then. With a checkpoint taken
``CHECKPOINT_S`` (0.8 s) after the last and written within ``FLUSH_S``
(0.2 s), what a crash can lose of a stream is about one second of it.

What the journal keeps of a request is its record (the row's columns and,
once it settles, its usage), until the ledger's batch holding its row lands
(its ``flush_interval_ms``, 100 by default, plus the batch's write; longer
while Postgres is slow or down, until the rows go to the spool). The parsed body rides on the
record (``UsageRecord.body``) only while the request runs, and its stream
meter (``progress``) likewise: settle drops both (``Billing.settle``), since a
settled record carries the usage its row bills (the provider's, or settle's
own count), which its checkpoint notes, counting nothing. Otherwise every
finished request's chat history stayed in memory until then: ~38 KiB each at
32 KB prompts (``tests/test_retention.py``).

On start, before serving, ``replay_orphans`` turns every journal of a dead
worker (its lock free, its spool already replayed) into usage rows for the
entries opened and never closed: ``status`` 500, ``error_code``
``interrupted``, ``details.interrupted`` true, the tokens of the last
checkpoint, counted against the quota. They go through the ledger's own
idempotent insert with the request's event id, so a replay repeated, or a
row that did reach Postgres before the crash, is never billed twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from proxy.config.tiers import Price
from proxy.core import tokens
from proxy.core.metering import StreamMeter
from proxy.core.pricing import price_usage
from proxy.core.record import UsageRecord
from proxy.core.usage import Usage
from proxy.stores.spool import _try_lock
from proxy.stores.usage_batch import UsageRow, write_batch

log = logging.getLogger("tollway.journal")

FLUSH_S = 0.2  # one append + fsync per worker at most this often
# The last part of each interval the journal waits for the ledger's next batch
# to land (``closed``) and writes just after it: the requests of the
# interval that closed meanwhile are then never written. The interval stays
# at most ``FLUSH_S``: with no batch landing, the write goes when it is up.
ALIGN_S = 0.05
CHECKPOINT_S = 0.8  # + FLUSH_S: a running request's usage on disk within ~1 s
COMPACT_BYTES = 4 << 20  # rewrite the file with only open entries beyond this size
INTERRUPTED_STATUS = 500


# What an ``o`` line holds, in this order (``Opened``): the row's fixed columns.
OPENED_KEYS = ("e", "p", "r", "t", "k", "w", "n", "m", "s", "l", "pt", "at")
# The values of OPENED_KEYS as admission had them; the period a ``date``.
Opened = tuple[Any, ...]
# Builds an entry's ``Opened`` values from its record, body and the wall-clock
# time it was opened at: called only for the entries still open when the
# journal is written (``Billing`` provides it). The body of a request that
# has settled meanwhile is gone: it gets ``{"stream": record.stream}``, all
# an ``o`` line reads of a body.
OpenedOf = Callable[[UsageRecord, dict[str, Any], float], Opened]
# A request noted since the last write: its record, the monotonic time it
# was noted at and its ``Opened`` values when the caller gave them.
_Fresh = tuple[UsageRecord, float, Opened | None]


@dataclass(slots=True)
class _Entry:
    """One admitted request, until its usage row is durable."""

    record: UsageRecord
    noted_at: float  # monotonic time of its last checkpoint (or of its open)
    values: Opened | None = None  # the row's fixed columns, once written (its ``o`` line)
    written: bool = False  # its ``o`` line is on disk
    seen: int = 0  # meter payloads already counted
    completion: int = 0
    prompt: int | None = None

    @property
    def opened(self) -> dict[str, Any]:
        """The ``o`` line's object: built only for the few requests still
        open when the journal is written (most close before)."""
        assert self.values is not None  # made before it is written
        out = dict(zip(OPENED_KEYS, self.values, strict=True))
        out["p"] = out["p"].isoformat()
        return out


class Journal:
    """One worker's journal; ``run`` is its flusher, ``close`` its end."""

    def __init__(
        self, path: Path, opened_of: OpenedOf | None = None, batch_every: float = 0.0
    ) -> None:
        self.path = path
        # How often the ledger's batches land (its ``flush_interval_ms``):
        # the write waits up to that long for the next one (``_align_s``).
        self.batch_every = batch_every
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _try_lock(path.with_suffix(".lock"))
        if self._lock_fd is None:
            raise RuntimeError(f"journal {path.name} is owned by a live process")
        self.opened_of = opened_of
        self._open: dict[str, _Entry] = {}  # noted at a write, not yet closed
        self._fresh: dict[str, _Fresh] = {}  # noted since the last write, not yet closed
        self._retry: list[str] = []  # in ``_open``, their ``o`` line's write failed
        self._gone: list[str] = []  # closed since the last flush, ``o`` on disk
        self._stopping = asyncio.Event()
        self._landed = asyncio.Event()  # a ledger batch closed its rows
        self._size = 0

    def open(self, values: Opened, record: UsageRecord, body: dict[str, Any]) -> None:
        """Note an admitted request (in memory; on disk at the next flush).
        ``values``: OPENED_KEYS' values, the event id first. The body goes
        on the record, which keeps it until the request settles."""
        record.body = body
        self._fresh[values[0]] = (record, time.monotonic(), values)

    def admitted(self, event_id: str, record: UsageRecord, body: dict[str, Any]) -> None:
        """``open`` without the values: they are made (``opened_of``) only if
        the request is still open when the journal is written; most close
        before, and then nothing is made for them at all."""
        record.body = body
        self._fresh[event_id] = (record, time.monotonic(), None)

    def closed(self, rows: Iterable[UsageRow]) -> None:
        """The ledger's hook: these rows are in Postgres or in the spool."""
        self._landed.set()
        unfresh, pop, gone = self._fresh.pop, self._open.pop, self._gone
        for row in rows:
            event_id = row.values[1]
            if unfresh(event_id, None) is None:  # not closed before a write: most are
                entry = pop(event_id, None)
                if entry is not None and entry.written:
                    gone.append(event_id)

    def open_count(self) -> int:
        return len(self._open) + len(self._fresh)

    def _align_s(self) -> float:
        """How long a write waits for the ledger's next batch: ``ALIGN_S``,
        or the ledger's interval when that is longer (so that a batch lands
        within the wait), at most ``FLUSH_S``."""
        return min(FLUSH_S, max(ALIGN_S, self.batch_every))

    async def run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_S - self._align_s()):
                    await self._stopping.wait()
            await self._next_batch()
            try:
                await self.flush()
            except OSError:
                log.exception("could not write the request journal; retrying")

    async def _next_batch(self) -> None:
        """Wait (at most ``_align_s``) for the ledger's next batch to land.
        Under load, a write at a random moment found most requests of its
        interval settled but their rows still queued (they land every
        ``flush_interval_ms``), and wrote an ``o`` line for each (measured:
        0.3 a request at c=16); just after a batch, only the requests still
        running are open. Idle, no batch lands and this is the timeout."""
        if self._stopping.is_set() or not (self._open or self._fresh):
            return
        self._landed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._align_s()):
                await self._landed.wait()

    def stop(self) -> None:
        self._stopping.set()
        self._landed.set()

    async def flush(self) -> None:
        if not self._open and not self._fresh and not self._gone:  # idle
            return
        fresh = [e for e in self._retry if e in self._open] + self._entries()
        self._retry = fresh  # until their values are made
        self._values(fresh)
        self._retry = []
        due = self._due(time.monotonic(), set(fresh))
        gone, self._gone = self._gone, []
        if not (fresh or due or gone):
            return
        opening = [self._open[e] for e in fresh]
        try:
            await asyncio.to_thread(self._write, opening, due, gone)
        except BaseException:
            self._retry[:0], self._gone[:0] = fresh, gone
            raise
        for event_id in fresh:
            entry = self._open.get(event_id)
            if entry is not None:
                entry.written = True
            else:  # closed while being written: its close goes next time
                self._gone.append(event_id)
        if self._size > COMPACT_BYTES:
            await asyncio.to_thread(self._compact, [e for e in self._open.values() if e.written])

    def _entries(self) -> list[str]:
        """The requests noted since the last write and still open, as
        entries of ``_open``: the ids, in the order they were noted."""
        fresh, self._fresh = self._fresh, {}
        entries = self._open
        for event_id, (record, noted_at, values) in fresh.items():
            entries[event_id] = _Entry(record, noted_at, values)
        return list(fresh)

    def _values(self, fresh: list[str]) -> None:
        """The ``o`` values of the entries about to be written (on the loop:
        the records are still being filled in)."""
        wall_offset = time.time() - time.monotonic()
        for event_id in fresh:
            entry = self._open[event_id]
            if entry.values is None:
                at = entry.noted_at + wall_offset  # the wall-clock time it opened at
                if self.opened_of is None:
                    raise RuntimeError("a journal written to needs its opened_of")
                record = entry.record
                body = getattr(record, "body", None)
                if body is None:  # settled: its row waits for the ledger
                    body = {"stream": record.stream}
                entry.values = self.opened_of(record, body, at)

    def _due(self, now: float, fresh: set[str]) -> list[_Entry]:
        """Running requests whose last note is ``CHECKPOINT_S`` old."""
        due = []
        for event_id, entry in self._open.items():
            if (entry.written or event_id in fresh) and now - entry.noted_at >= CHECKPOINT_S:
                entry.noted_at = now
                due.append(entry)
        return due

    def _write(self, opening: list[_Entry], due: list[_Entry], gone: list[str]) -> None:
        """In a thread: the lines, then one append and one fsync."""
        lines = _lines(opening, due, gone)
        with open(self.path, "ab") as fh:
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())
            self._size = fh.tell()

    def _compact(self, snapshot: list[_Entry]) -> None:
        """Rewrite the file with the open entries only (atomically)."""
        lines = b"".join(
            orjson.dumps({"o": e.opened}) + b"\n" + orjson.dumps(_noted(e)) + b"\n"
            for e in snapshot
        )
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._size = len(lines)

    async def close(self) -> None:
        """Final flush; the file goes when nothing in it is still open."""
        self.stop()
        await self.flush()
        if not any(e.written for e in self._open.values()):
            self.path.unlink(missing_ok=True)
            self.path.with_suffix(".lock").unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _lines(opening: list[_Entry], due: list[_Entry], gone: list[str]) -> bytes:
    """In a thread: the checkpoints count tokens (only the text new since
    the last one), which must not hold up the event loop. The closed ids
    of the interval go in one ``x`` line."""
    out = [orjson.dumps({"o": e.opened}) for e in opening]
    out += [orjson.dumps(_checkpoint(entry)) for entry in due]
    if gone:
        out.append(orjson.dumps({"x": gone}))
    return b"".join(line + b"\n" for line in out)


def _checkpoint(entry: _Entry) -> dict[str, Any]:
    record = entry.record
    assert entry.values is not None  # written or being written: its values made
    if record.usage.total_tokens > 0:
        # The provider's usage is in (the request settled; its row waits for
        # the ledger's next batch): that is what the checkpoint notes, and
        # what the row bills. Nothing to count.
        return _noted(entry)
    meter = record.progress
    if isinstance(meter, StreamMeter):
        payloads = meter.payloads
        new = payloads[entry.seen : len(payloads)]
        entry.seen += len(new)
        if new:
            model = record.provider_model or str(entry.values[7] or "")
            entry.completion += tokens.count_text(meter.text_of(new), model)
    body = getattr(record, "body", None)  # None once settled (with no usage: nothing to count)
    if entry.prompt is None and body is not None:
        endpoint, model = record.endpoint, record.provider_model or record.public_model or ""
        entry.prompt = tokens.count_prompt(body, endpoint, model)
    return _noted(entry)


def _noted(entry: _Entry) -> dict[str, Any]:
    record = entry.record
    assert entry.values is not None  # written entries only
    usage = record.usage if record.usage.total_tokens > 0 else None
    return {
        "c": entry.values[0],
        "pt": usage.prompt_tokens if usage else entry.prompt or 0,
        "ct": max(usage.completion_tokens, entry.completion) if usage else entry.completion,
        "src": "provider" if usage else "estimated",
        "pv": record.provider,
        "pm": record.provider_model,
        "sm": record.served_model,
        "st": record.stream,
        "n": record.attempts,
        "at": time.time(),
    }


# --- replay, at start -------------------------------------------------------


def interrupted_rows(lines: bytes, prices: Mapping[str, Price]) -> list[UsageRow]:
    """The rows of entries opened and never closed, at their last checkpoint."""
    opened: dict[str, dict[str, Any]] = {}
    noted: dict[str, dict[str, Any]] = {}
    for line in lines.splitlines():
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # a line cut by the crash: the fsync before it holds
        if "o" in obj:
            opened[obj["o"]["e"]] = obj["o"]
        elif "c" in obj:
            noted[obj["c"]] = obj
        elif "x" in obj:
            closed = obj["x"]  # the ids closed in one interval (one id: older lines)
            for event_id in closed if isinstance(closed, list) else (closed,):
                opened.pop(event_id, None)
    return [_row(o, noted.get(e, {}), prices) for e, o in opened.items()]


def _row(o: dict[str, Any], c: dict[str, Any], prices: Mapping[str, Price]) -> UsageRow:
    prompt, completion = int(c.get("pt") or o.get("pt") or 0), int(c.get("ct") or 0)
    usage = Usage(prompt, completion)
    cost = price_usage(prices, usage, c.get("pv"), c.get("pm"), c.get("sm") or o.get("m"))
    latency = (c["at"] - o["at"]) * 1000 if "at" in c else 0.0
    details = orjson.dumps({"interrupted": True}).decode()
    values = (
        date.fromisoformat(o["p"]),
        o["e"],
        o["r"],
        o["t"],
        o["k"],
        o["w"],
        o["n"],
        o.get("m"),
        c.get("pv"),
        c.get("pm"),
        prompt,
        completion,
        c.get("src", "estimated" if prompt else "none"),
        True,  # admitted and possibly billed by the provider: it counts
        False,
        bool(c.get("st", o.get("s", False))),
        False,
        INTERRUPTED_STATUS,
        "interrupted",
        latency,
        None,
        int(c.get("n") or 0),
        cost,
        details,
        None,  # end_user, tags, client_ip: not journalled
        None,
        None,
    )
    return UsageRow(values, leased=bool(o.get("l")))


async def replay_orphans(
    pool: asyncpg.Pool, directory: Path, own: Path, prices: Mapping[str, Price]
) -> int:
    """Bill the interrupted requests of dead workers' journals, then remove
    them. A journal whose worker's spool is still there waits for it: a row
    in that spool is the request's real row, which must land first."""
    total = 0
    for path in sorted(directory.glob("journal-*.jsonl")):  # noqa: ASYNC240 - once, at start
        worker = path.stem.removeprefix("journal-")
        if path == own or (directory / f"spool-{worker}.jsonl").exists():
            continue
        lock = _try_lock(path.with_suffix(".lock"))
        if lock is None:
            continue  # its worker is alive
        try:
            rows = interrupted_rows(path.read_bytes(), prices)
            for i in range(0, len(rows), 1000):
                await write_batch(pool, rows[i : i + 1000])
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            log.warning("could not bill the journal %s yet; next start retries", path.name)
            continue
        finally:
            os.close(lock)
        path.unlink(missing_ok=True)
        path.with_suffix(".lock").unlink(missing_ok=True)
        total += len(rows)
    if total:
        log.warning("billed %d requests interrupted by a crash (status 500, interrupted)", total)
    return total
