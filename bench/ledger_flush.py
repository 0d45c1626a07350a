"""What one usage batch costs the gateway's process, natively, at git revisions.

The ledger writes a batch every ``flush_interval_ms`` (20 ms): natively, at
c=16, 50-90 rows a batch (``syscalls.py --ledger``). Callgrind stretches that
clock to 1 s (``instructions.py``), so a batch's fixed cost (its round trips,
each a send, a wake-up of the loop and a reply to parse) is spread over ~50x
more rows there than natively. This writes ``--batches`` batches of
``--rows`` rows through each revision's own ``write_batch`` and pool (the
gateway's ``open_pool``, one connection) into an embedded Postgres migrated
by that revision, rows with quota and budget leases and a key (every
statement a batch can send but the alert marks), and reports per batch:

- the statements sent (each one round trip; asyncpg's query logger),
- the client's CPU (user + sys of this process, ``time.process_time``) and
  the wall time, medians of ``--repeats``;

and the client CPU per row, which is what a request pays for its batch::

    .venv/bin/python bench/ledger_flush.py --revs a8e32fc,HEAD [--rows 64 --batches 300]

Each revision runs in a child with that revision's ``proxy`` first on the
path (``git archive``), against a database of its own in one server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import revisions

WORKER = "w-flush"


async def _child(dsn: str, data_dir: Path, batches: int, n: int, repeats: int) -> dict[str, Any]:
    # Imported here: the revision measured is the ``proxy`` first on the path.
    from proxy.stores import accounts, apikeys
    from proxy.stores.migrate import migrate
    from proxy.stores.usage_batch import COLUMNS, UsageRow, write_batch
    from proxy.web.billing_setup import BillingOptions, open_pool

    await migrate(dsn)
    pool = await open_pool(BillingOptions(dsn, data_dir, pool_size=1))
    await accounts.create_tenant(pool, "bench", "bench", {"bench"}, "bench")
    hasher = apikeys.KeyHasher(apikeys.load_secret(data_dir))
    key = await accounts.create_key(pool, hasher, "bench", "k", None, None, {"bench"}, "bench")
    tenant_id = await pool.fetchval("SELECT id FROM tenants WHERE name = 'bench'")
    today = datetime.now(UTC).date()
    period = today.replace(day=1)
    big = 10**15
    await pool.execute(
        "INSERT INTO quota_leases (worker_id, tenant_id, period, requests, tokens)"
        " VALUES ($1, $2, $3, $4, $4)",
        WORKER,
        tenant_id,
        period,
        big,
    )
    for subject in (f"t:{tenant_id}", f"k:{key['key_id']}"):
        for span, at in (("month", period), ("day", today)):
            await pool.execute(
                "INSERT INTO budget_leases (worker_id, subject, span, period, micros)"
                " VALUES ($1, $2, $3, $4, $5)",
                WORKER,
                subject,
                span,
                at,
                big,
            )
    counter = iter(range(10**9))

    def rows() -> list[Any]:
        out = []
        for _ in range(n):
            i = next(counter)
            values = {
                "period": period,
                "event_id": f"ev-{i}",
                "request_id": f"req-{i}",
                "tenant_id": tenant_id,
                "key_id": key["key_id"],
                "worker_id": WORKER,
                "endpoint": "chat",
                "public_model": "bench-model",
                "provider": "openai",
                "provider_model": "bench-model",
                "prompt_tokens": 120,
                "completion_tokens": 40,
                "usage_source": "provider",
                "counted": True,
                "cached": False,
                "stream": False,
                "client_disconnected": False,
                "status": 200,
                "latency_ms": 12.5,
                "attempts": 1,
                "cost_usd": Decimal("0.0002"),
                "client_ip": "127.0.0.1",
            }
            out.append(UsageRow(tuple(values.get(c) for c in COLUMNS), True, today, True))
        return out

    for _ in range(20):  # warm: statements prepared, plans cached
        await write_batch(pool, rows())
    cpu, wall = [], []
    for _ in range(repeats):
        made = [rows() for _ in range(batches)]
        c0, w0 = time.process_time(), time.perf_counter()
        for batch in made:
            await write_batch(pool, batch)
        cpu.append((time.process_time() - c0) / batches)
        wall.append((time.perf_counter() - w0) / batches)
    # The statements, counted apart (the logger has a cost of its own).
    sent: list[str] = []

    def log(query: Any) -> None:
        sent.append(query.query)

    async with pool.acquire() as conn:  # the pool's only connection
        conn.add_query_logger(log)
    for _ in range(20):
        await write_batch(pool, rows())
    async with pool.acquire() as conn:
        conn.remove_query_logger(log)  # its last callbacks run meanwhile
    statements = len(sent) / 20
    await pool.close()
    return {"statements": statements, "cpu": cpu, "wall": wall}


def compare(revs: list[str], batches: int, n: int, repeats: int) -> None:
    from proxy.stores.embedded import EmbeddedPostgres

    print(
        f"- command: bench/ledger_flush.py --revs {','.join(revs)} --rows {n}"
        f" --batches {batches} --repeats {repeats}"
    )
    print(
        "\n| rev | statements (round trips) a batch | client CPU µs a batch "
        "| client CPU µs a row | wall ms a batch | CPU repeats (µs a batch) |"
        "\n|---|---:|---:|---:|---:|---|"
    )
    with tempfile.TemporaryDirectory(prefix="tollway-ledger-flush-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "pg", cleanup="delete")
        dsn = pg.start()
        try:
            for i, rev in enumerate(revs):
                tree = revisions.export(rev, Path(tmp) / f"rev{i}")
                db = f"flush{i}"
                subprocess.run(
                    [sys.executable, "-c", _CREATE_DB, dsn, db], check=True, env=os.environ
                )
                data = Path(tmp) / f"data{i}"
                data.mkdir()
                env = {**os.environ, "PYTHONPATH": str(tree)}
                argv = [sys.executable, __file__, "--child", _with_db(dsn, db), str(data)]
                argv += [str(batches), str(n), str(repeats)]
                out = orjson.loads(
                    subprocess.run(argv, check=True, capture_output=True, env=env).stdout
                )
                cpu = statistics.median(out["cpu"]) * 1e6
                wall = statistics.median(out["wall"]) * 1e3
                each = ", ".join(f"{c * 1e6:.0f}" for c in out["cpu"])
                print(
                    f"| {rev} | {out['statements']:.2f} | {cpu:.0f} | {cpu / n:.1f} "
                    f"| {wall:.2f} | {each} |",
                    flush=True,
                )
        finally:
            pg.stop()


_CREATE_DB = """
import asyncio, sys, asyncpg
async def main():
    conn = await asyncpg.connect(sys.argv[1])
    await conn.execute(f'CREATE DATABASE "{sys.argv[2]}"')
    await conn.close()
asyncio.run(main())
"""


def _with_db(dsn: str, db: str) -> str:
    """The DSN with another database name (the path part of the URL)."""
    head, sep, query = dsn.partition("?")
    base = head.rsplit("/", 1)[0]
    return f"{base}/{db}{sep}{query}"


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--child":
        dsn, data, b, r, rep = sys.argv[2:]
        result = asyncio.run(_child(dsn, Path(data), int(b), int(r), int(rep)))
        sys.stdout.buffer.write(orjson.dumps(result))
    else:
        parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
        parser.add_argument("--revs", default="HEAD", help="comma-separated git revisions")
        parser.add_argument("--rows", type=int, default=64, help="rows a batch")
        parser.add_argument("--batches", type=int, default=300, help="batches a repeat")
        parser.add_argument("--repeats", type=int, default=5)
        args = parser.parse_args()
        compare(args.revs.split(","), args.batches, args.rows, args.repeats)
