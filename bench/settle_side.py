"""The settle side of N billed requests, in-process, for callgrind.

What a billed request costs after its answer, and nothing else: the journal
note made at admission, ``Billing.settle`` (quota and budget release, the
price, the usage row), the access log's settle, and per 100 rows the
ledger's batch JSON and the journal's close. No network, no Postgres: the
ledger is a list. Run it under callgrind at N and at 0 (imports and setup
alone) and divide the difference by N; deterministic to a few hundred
instructions, so a change of a few thousand per request shows, where the
gateway-level ``instructions.py`` moves 3-6% run to run. At git
revisions (each one's ``proxy`` from ``git archive``, first on the path;
this file's own loop for all of them)::

    .venv/bin/python bench/settle_side.py --revs 4e8cd02,HEAD [--n 2000]

or by hand, for the tree on the path: ``settle_side.py 2000`` (and ``0``)
under ``valgrind --tool=callgrind``. Its APIs are those of 4b7b70a and
later (``Billing.journal_open``). The reservation and hold carry the leases
they were taken from, as an admission's do since lease5 (b98bd3f).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import revisions

PERIOD = date(2026, 12, 1)


class _Queue:
    """The ledger's ``add``; the rows stay here until the next batch."""

    def __init__(self) -> None:
        self.rows: list[Any] = []
        self.on_durable = None

    def add(self, row: Any) -> None:
        self.rows.append(row)


class _Lines:
    def add(self, line: bytes) -> None:
        pass


def main(n: int) -> None:
    # Imported here: the revision measured is the ``proxy`` first on the path.
    from proxy.config.tiers import BillingPolicy, Price, Prices
    from proxy.core import ids
    from proxy.core.record import AttemptRecord, UsageRecord
    from proxy.core.usage import Usage
    from proxy.stages.admit import billing
    from proxy.stages.settle.access_log import AccessLog
    from proxy.stores.budgets import BudgetBook, Hold, Limit
    from proxy.stores.journal import Journal

    try:
        from proxy.stores.usage_batch import batch_json
    except ImportError:  # a revision before the ledger's split
        from proxy.stores.ledger import batch_json  # type: ignore[attr-defined,no-redef]
    from proxy.stores.quota import QuotaBook, Reservation

    gc.disable()  # a collection's cost depends on what else is alive: not the path's
    journal = Journal(Path(tempfile.mkdtemp()) / "journal-w.jsonl")
    prices = Prices({"gpt-4o-mini": Price(Decimal("0.15"), Decimal("0.6"))})
    quota = QuotaBook(None, "w-1", BillingPolicy())  # type: ignore[arg-type]
    budgets = BudgetBook(None, "w-1", 1_000_000, 1.0)  # type: ignore[arg-type]
    queue = _Queue()
    bill = billing.Billing(None, quota, queue, prices, journal, budgets)  # type: ignore[arg-type]
    access = AccessLog(_Lines())  # type: ignore[arg-type]
    subjects = ("t:1", "k:key_1")
    limits = tuple(Limit(s, span, PERIOD, 10**9, s) for s in subjects for span in ("month", "day"))
    for limit in limits:  # leases with room: what the request reserved goes back
        budgets._lease(limit).micros = 10**12
    quota._lease(1, PERIOD).tokens = 10**9
    # The leases an admission's reservation and hold carry (``take_from``),
    # so the refunds give back to them as a real admission's do; before
    # lease5 (a8e32fc and older) there were none: looked up instead.
    kept = quota._leases[(1, PERIOD)], tuple(budgets._leases[limit.key] for limit in limits)
    carry = "lease" in getattr(Reservation, "__slots__", ())
    for _ in range(n):
        record = UsageRecord(
            "req-abc",
            "chat",
            public_model="gpt-4o-mini",
            tenant="acme",
            tenant_id=1,
            key_id="key_1",
            key_prefix="tw-abcdefg",
            client_ip="127.0.0.1",
        )
        if carry:
            reservation = Reservation(1, PERIOD, 1, 4000, True, kept[0])
            hold = Hold(limits, 500, PERIOD, kept[1])
        else:
            reservation = Reservation(1, PERIOD, 1, 4000, True)
            hold = Hold(limits, 500, PERIOD)
        record.admission = billing.Admission(
            None,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            reservation,
            4000,
            ids.event_id(),
            100,
            hold,
        )
        bill.journal_open(record, {"stream": False})
        record.provider, record.provider_model = "openai", "gpt-4o-mini"
        record.served_model = "gpt-4o-mini"
        record.usage, record.latency_ms, record.attempts = Usage(120, 40, "provider"), 12.3, 1
        record.attempt_log.append(AttemptRecord("openai", "gpt-4o-mini", 200))
        bill.settle(record)
        access.settle(record)
        if len(queue.rows) >= 100:
            batch_json(queue.rows)
            journal.closed(queue.rows)
            queue.rows = []


def _instructions(tree: Path, n: int) -> int:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
    return revisions.instructions([sys.executable, __file__, str(n)], env)


def compare(revs: list[str], n: int) -> None:
    """Instructions per billed request at each revision: (at N - at 0) / N."""
    print(f"- command: bench/settle_side.py --revs {','.join(revs)} --n {n}")
    print("\n| rev | instructions per billed request |\n|---|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for rev in revs:
            tree = revisions.export(rev, Path(tmp) / rev.replace("/", "_"), ("proxy",))
            base, full = _instructions(tree, 0), _instructions(tree, n)
            print(f"| {rev} | {(full - base) / n:,.0f} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].isdigit():  # the child, under callgrind
        main(int(sys.argv[1]))
    else:
        parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
        parser.add_argument("--revs", default="HEAD", help="comma-separated git revisions")
        parser.add_argument("--n", type=int, default=2000, help="billed requests")
        args = parser.parse_args()
        compare(args.revs.split(","), args.n)
