"""``tollway usage`` — spend and usage from the daily rollups, as a table, JSON or CSV."""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from proxy.stores import analytics, migrate, pgdsn
from proxy.stores import embedded as datastores


def add_command(sub: Any) -> None:
    p = sub.add_parser("usage", help="spend and usage (daily rollups)")
    p.add_argument("--tenant")
    p.add_argument("--key", help="a key id (key_...)")
    p.add_argument("--model", help="a public or served model")
    p.add_argument("--from", dest="start", help="first day, YYYY-MM-DD (default: 1st of month)")
    p.add_argument("--to", dest="end", help="last day, YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--group-by", default="day", choices=analytics.GROUPS)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON")
    out.add_argument("--csv", action="store_true", help="print CSV")
    p.add_argument("--config", help="YAML config (unused; accepted like the other commands)")


def run(args: argparse.Namespace) -> int:
    params = {
        "tenant": args.tenant,
        "key": args.key,
        "model": args.model,
        "from": args.start,
        "to": args.end,
        "group_by": args.group_by,
    }
    try:
        query = analytics.query_from(params, datetime.now(UTC).date())
    except analytics.BadQuery as exc:
        print(f"tollway: --{exc.param.replace('_', '-')}: {exc}", file=sys.stderr)
        return 2
    rows = asyncio.run(_report(query))
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    elif args.csv:
        _csv(query.group_by, rows)
    else:
        _table(query, rows)
    return 0


async def _report(query: analytics.UsageQuery) -> list[dict[str, Any]]:
    pool = await asyncpg.create_pool(
        **pgdsn.options(datastores.database_url()), min_size=1, max_size=1
    )
    assert pool is not None
    try:
        await migrate.check(pool)
        return await analytics.report(pool, query)
    finally:
        await pool.close()


def _csv(group_by: str, rows: list[dict[str, Any]]) -> None:
    writer = csv.DictWriter(sys.stdout, fieldnames=[group_by, *analytics.FIELDS])
    writer.writeheader()
    writer.writerows(rows)


def _table(query: analytics.UsageQuery, rows: list[dict[str, Any]]) -> None:
    span = f"{query.start.isoformat()} .. {query.end.isoformat()}"
    if not rows:
        print(f"no usage from {span}")
        return
    columns = [query.group_by, *analytics.FIELDS]
    cells = [[str(r[c]) if r[c] != "" else "-" for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(f"usage {span} by {query.group_by}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
