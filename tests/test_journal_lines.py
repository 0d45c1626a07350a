"""The journal's lines for requests admitted without their ``o`` values made
(``Journal.admitted``): the values are read off the request when it is
still open at a write, the ids closed in one interval go in one ``x`` line,
and a crash replay bills exactly the requests left open, whatever lines an
older version wrote."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import orjson
import pytest

from proxy.core.record import UsageRecord
from proxy.core.usage import Usage
from proxy.stores import journal as journal_module
from proxy.stores.journal import OPENED_KEYS, Journal, interrupted_rows
from proxy.stores.ledger import COLUMNS, UsageRow
from tests.usage_rows import closed_row, opened_of

PERIOD = date(2026, 12, 1)


_opened = opened_of(PERIOD)


def _row(event_id: str) -> UsageRow:
    return closed_row(PERIOD, event_id)


async def test_closed_requests_are_not_billed_again_and_open_ones_are(tmp_path: Path) -> None:
    path = tmp_path / "journal-w.jsonl"
    journal = Journal(path, _opened)
    for rid in ("a", "b", "c"):
        journal.admitted("ev-" + rid, UsageRecord(rid, "chat"), {"stream": rid == "c"})
    journal.closed([_row("ev-a")])  # durable before the journal was written: no line at all
    await journal.flush()
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [line["o"]["e"] for line in lines] == ["ev-b", "ev-c"]
    assert lines[1]["o"]["s"] is True and lines[1]["o"]["p"] == "2026-12-01"

    journal.closed([_row("ev-b"), _row("ev-c")])
    await journal.flush()
    *_, last = path.read_bytes().splitlines()
    assert orjson.loads(last) == {"x": ["ev-b", "ev-c"]}  # one line for the interval
    assert interrupted_rows(path.read_bytes(), {}) == []
    await journal.close()


def test_a_replay_reads_the_one_id_close_lines_of_an_older_version() -> None:
    values = ("ev-1", "2026-12-01", "r", 7, "k", "w", "chat", "m", False, True, 5, 1.5)
    opened = dict(zip(OPENED_KEYS, values, strict=True))
    lines = [{"o": opened}, {"o": {**opened, "e": "ev-2"}}, {"x": "ev-1"}]
    rows = interrupted_rows(b"\n".join(orjson.dumps(line) for line in lines), {})
    assert [dict(zip(COLUMNS, r.values, strict=True))["event_id"] for r in rows] == ["ev-2"]


async def test_a_settled_request_is_checkpointed_at_the_providers_usage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request whose row waits for the ledger's next batch is noted at the
    usage the provider reported (what its row bills), and a crash replay
    bills that, not an estimate."""
    monkeypatch.setattr(journal_module, "CHECKPOINT_S", 0.0)  # every write checkpoints
    path = tmp_path / "journal-w.jsonl"
    journal = Journal(path, _opened)
    record = UsageRecord("a", "chat", provider="p", provider_model="pm")
    journal.admitted("ev-a", record, {"messages": [{"role": "user", "content": "hi " * 500}]})
    record.usage = Usage(321, 45, "provider")
    await journal.flush()
    [row] = interrupted_rows(path.read_bytes(), {})
    got = dict(zip(COLUMNS, row.values, strict=True))
    assert (got["prompt_tokens"], got["completion_tokens"], got["usage_source"]) == (
        321,
        45,
        "provider",
    )
    await journal.close()
