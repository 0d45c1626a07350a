"""What one usage batch costs Postgres, per row and by part of the statement.

A billed request costs the machine its gateway's CPU and the database's:
``syscalls.py --stores`` reads the second under load (~55-60 µs a request
here, against ~5-10 for the yardstick ``floor_db_batch``'s one-table
insert). This says where it goes: on a fresh embedded Postgres with the
schema, it writes ``--batches`` batches of ``--rows`` realistic rows (one
tenant and key, as the benchmark's) through ``tollway_write_usage`` (the
ledger's one call a batch), reports the wall time per row, then runs the
batch's first statement (``usage_batch._WRITE``) once more under
``EXPLAIN ANALYZE`` and prints each part's time (its CTEs and the final
select)::

    .venv/bin/python bench/usage_write.py [--rows 100] [--batches 200]

Wall time per row includes the client's JSON and the round trip; the
EXPLAIN times are the server's alone (one batch: read them as shares). A
CTE's time includes the CTEs it is the first to read: ``rows`` (the
batch's JSON unpacked) is inside ``ins`` (the events inserted), which is
inside ``agg``; the others read them materialized.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
import uuid
from datetime import date
from decimal import Decimal
from pathlib import Path

import asyncpg

from proxy.stores import usage_batch
from proxy.stores.embedded import EmbeddedPostgres
from proxy.stores.migrate import migrate

_DETAILS = '{"cached_tokens": 10, "reasoning_tokens": 0}'


def _row(i: int, tenant_id: int, key_id: str) -> usage_batch.UsageRow:
    """A billed chat request as the ledger writes it (columns in ``COLUMNS`` order)."""
    today = date.today()
    values = (
        date(today.year, today.month, 1),
        uuid.uuid4().hex,
        f"req-{i}",
        tenant_id,
        key_id,
        "w-bench",
        "chat",
        "gpt-4o-mini",
        "openai",
        "gpt-4o-mini-2024-07-18",
        8000,
        200,
        "provider",
        True,
        False,
        False,
        False,
        200,
        None,
        12.5,
        3.1,
        1,
        Decimal("0.0012345"),
        _DETAILS,
        None,
        None,
        "127.0.0.1",
    )
    return usage_batch.UsageRow(values, True, today, True)


def _parts(plan: list[str]) -> list[tuple[str, float]]:
    """The top-level parts of the plan (``CTE name`` and the final select)
    with their inclusive time in ms."""
    out: list[tuple[str, float]] = []
    name = None
    for line in plan:
        cte = re.match(r"  CTE (\w+)", line)
        if cte:
            name = cte.group(1)
            continue
        timed = re.search(r"actual time=[\d.]+\.\.([\d.]+) rows=[\d.]+ loops=(\d+)", line)
        if name and timed:
            out.append((f"CTE {name}", float(timed.group(1)) * int(timed.group(2))))
            name = None
    for line in plan:
        if line.startswith("Execution Time"):
            out.append(("execution (all)", float(line.split(":")[1].split()[0])))
    return out


async def _measure(dsn: str, rows: int, batches: int) -> None:
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        tenant_id = await conn.fetchval(
            "INSERT INTO tenants (name, tier) VALUES ('bench', 'pro') RETURNING id"
        )
        key = "key_bench"
        for _ in range(20):  # warm: plans cached, pages in
            batch = [_row(i, tenant_id, key) for i in range(rows)]
            await conn.fetch(usage_batch._CALL, usage_batch.batch_json(batch), [key])
        elapsed = 0.0
        for _ in range(batches):
            arg = usage_batch.batch_json([_row(i, tenant_id, key) for i in range(rows)])
            t0 = time.perf_counter()
            await conn.fetch(usage_batch._CALL, arg, [key])
            elapsed += time.perf_counter() - t0
        print(
            f"tollway_write_usage: {elapsed / batches / rows * 1e6:.1f} µs a row wall "
            f"(batches of {rows}, {batches} batches, one connection)\n"
        )
        arg = usage_batch.batch_json([_row(i, tenant_id, key) for i in range(rows)])
        plan = [r[0] for r in await conn.fetch("EXPLAIN (ANALYZE) " + usage_batch._WRITE, arg)]
    finally:
        await conn.close()
    print("| part of the batch's first statement | ms (one batch) | µs a row |\n|---|---:|---:|")
    for part, ms in _parts(plan):
        print(f"| {part} | {ms:.2f} | {ms * 1000 / rows:.1f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100, help="rows a batch")
    p.add_argument("--batches", type=int, default=200, help="batches timed")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tollway-usage-write-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "pg", cleanup="delete")
        dsn = pg.start()
        try:
            asyncio.run(_measure(dsn, args.rows, args.batches))
        finally:
            pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
