"""Usage rows and the journal's ``o`` values for the ledger and journal
tests, made from the ledger's own column list (a column the row gains needs
no test edit)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from typing import Any

from proxy.core.record import UsageRecord
from proxy.stores.journal import Opened, OpenedOf
from proxy.stores.ledger import COLUMNS, UsageRow


def usage_row(values: Mapping[str, Any], leased: bool) -> UsageRow:
    """A row with ``values`` by column name, every other column None."""
    return UsageRow(tuple(values.get(c) for c in COLUMNS), leased=leased)


def closed_row(period: date, event_id: str) -> UsageRow:
    """A row as the journal's ``closed`` reads it: only its event named."""
    return usage_row({"period": period, "event_id": event_id}, leased=True)


def opened_of(period: date) -> OpenedOf:
    """A journal's ``opened_of`` for requests admitted in ``period``: the
    event id is ``ev-`` and the request id, the rest fixed."""

    def opened(record: UsageRecord, body: dict[str, Any], at: float) -> Opened:
        event_id = "ev-" + record.request_id
        stream = body.get("stream") is True
        return (
            event_id,
            period,
            record.request_id,
            7,
            "key_j",
            "w",
            "chat",
            "m",
            stream,
            True,
            5,
            at,
        )

    return opened
