"""``tollway batches list|show|cancel`` — the operator's view of every
tenant's batches, straight from Postgres (no running gateway needed: a
cancelled batch is ended by whichever worker sweeps next)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from proxy.stores import embedded as datastores
from proxy.stores import migrate
from proxy.stores.batches import BatchStore


def add_command(sub: Any) -> None:
    p = sub.add_parser("batches", help="list, show or cancel batches (every tenant's)")
    verbs = p.add_subparsers(dest="verb", required=True)
    listing = verbs.add_parser("list", help="the newest batches")
    listing.add_argument("--tenant", help="only this tenant's (its name)")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--json", action="store_true", help="print JSON")
    show = verbs.add_parser("show", help="one batch, as the API returns it")
    show.add_argument("batch_id")
    cancel = verbs.add_parser("cancel", help="cancel a batch (its running lines finish)")
    cancel.add_argument("batch_id")
    for verb in (listing, show, cancel):
        verb.add_argument("--config", help="YAML config (unused; accepted like the other commands)")


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    pool = await asyncpg.create_pool(datastores.database_url(), min_size=1, max_size=1)
    assert pool is not None
    try:
        await migrate.check(pool)
        store = BatchStore(pool, timedelta(days=30))
        if args.verb == "list":
            return await _list(pool, store, args)
        tenant_id = await store.owner(args.batch_id)
        if tenant_id is None:
            print(f"tollway: no batch {args.batch_id}", file=sys.stderr)
            return 1
        if args.verb == "cancel":
            batch = await store.cancel(tenant_id, args.batch_id)
        else:
            batch = await store.get(tenant_id, args.batch_id)
        assert batch is not None
        print(orjson.dumps(batch, option=orjson.OPT_INDENT_2).decode())
        if args.verb == "cancel" and batch["status"] not in ("cancelling", "cancelled"):
            print(f"tollway: a {batch['status']} batch cannot be cancelled", file=sys.stderr)
            return 1
        return 0
    finally:
        await pool.close()


async def _list(pool: asyncpg.Pool, store: BatchStore, args: argparse.Namespace) -> int:
    tenant_id = None
    if args.tenant:
        tenant_id = await pool.fetchval("SELECT id FROM tenants WHERE name = $1", args.tenant)
        if tenant_id is None:
            print(f"tollway: no tenant {args.tenant}", file=sys.stderr)
            return 1
    batches, _ = await store.page(tenant_id, None, max(1, min(args.limit, 1000)))
    if args.json:
        print(orjson.dumps(batches, option=orjson.OPT_INDENT_2).decode())
        return 0
    if not batches:
        print("no batches")
        return 0
    columns = ("id", "status", "endpoint", "done", "failed", "total", "created")
    rows = [_row(b) for b in batches]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    return 0


def _row(b: dict[str, Any]) -> list[str]:
    counts = b["request_counts"]
    created = datetime.fromtimestamp(b["created_at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
    return [
        b["id"],
        b["status"],
        b["endpoint"],
        str(counts["completed"]),
        str(counts["failed"]),
        str(counts["total"]),
        created,
    ]
