"""The journal writes just after a ledger batch lands: a request whose row
landed meanwhile is never written, and neither a stop nor an idle journal
waits for a batch."""

from __future__ import annotations

import asyncio
from datetime import date
from pathlib import Path

import orjson
import pytest

from proxy.core.record import UsageRecord
from proxy.core.tasks import TaskGroup
from proxy.stores import journal as journal_module
from proxy.stores.journal import Journal
from proxy.stores.ledger import UsageRow
from tests.usage_rows import closed_row, opened_of
from tests.waiting import until

PERIOD = date(2026, 12, 1)


_opened = opened_of(PERIOD)


def _row(event_id: str) -> UsageRow:
    return closed_row(PERIOD, event_id)


async def test_the_write_follows_the_batch_and_skips_what_it_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The whole interval is the wait for a batch, and it is long: a write
    # within the test's bound can only be the batch's doing.
    monkeypatch.setattr(journal_module, "FLUSH_S", 30.0)
    monkeypatch.setattr(journal_module, "ALIGN_S", 30.0)
    path = tmp_path / "journal-w.jsonl"
    journal = Journal(path, _opened)
    for rid in ("a", "b"):
        journal.admitted("ev-" + rid, UsageRecord(rid, "chat"), {})
    journal.closed([_row("ev-unrelated")])  # a batch that landed before the wait began
    tasks = TaskGroup()
    task = tasks.spawn(journal.run())
    try:
        # Waiting for the next batch, not satisfied by the one before.
        await until(lambda: not journal._landed.is_set(), what="the journal waits for a batch")
        assert not path.exists()
        journal.closed([_row("ev-a")])  # the ledger's next batch: a's row is durable
        await until(lambda: path.exists() and path.stat().st_size > 0, what="the journal wrote")
        lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
        assert [line["o"]["e"] for line in lines] == ["ev-b"]  # a: never written
        journal.stop()  # a stop does not wait for a batch either
        async with asyncio.timeout(5):
            await task
    finally:
        task.cancel()
        await journal.close()


async def test_an_idle_journal_waits_for_no_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing open: no batch will land, and the interval is not stretched."""
    monkeypatch.setattr(journal_module, "ALIGN_S", 30.0)
    journal = Journal(tmp_path / "journal-w.jsonl", _opened)
    async with asyncio.timeout(5):
        await journal._next_batch()
    await journal.close()


async def test_the_wait_for_a_batch_covers_the_ledgers_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the ledger's batches further apart than ``ALIGN_S`` (its 100 ms
    default), the journal waits up to the ledger's interval for the next
    one, so a batch still lands within the wait and what it closed is never
    written."""
    monkeypatch.setattr(journal_module, "FLUSH_S", 30.0)
    monkeypatch.setattr(journal_module, "ALIGN_S", 0.001)  # alone it would miss the batch
    path = tmp_path / "journal-w.jsonl"
    journal = Journal(path, _opened, batch_every=30.0)
    for rid in ("a", "b"):
        journal.admitted("ev-" + rid, UsageRecord(rid, "chat"), {})
    journal.closed([_row("ev-unrelated")])  # so that the wait shows as the flag cleared
    tasks = TaskGroup()
    task = tasks.spawn(journal.run())
    try:
        await until(lambda: not journal._landed.is_set(), what="the journal waits for a batch")
        journal.closed([_row("ev-a")])
        await until(lambda: path.exists() and path.stat().st_size > 0, what="the journal wrote")
        lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
        assert [line["o"]["e"] for line in lines] == ["ev-b"]
        journal.stop()
        async with asyncio.timeout(5):
            await task
    finally:
        task.cancel()
        await journal.close()
