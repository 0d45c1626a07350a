"""Spend and usage reports (``GET /admin/usage``, ``tollway usage``).

Grouped by ``day``, ``model`` (the model that served), ``key`` or
``tenant``, a report reads the rollups (``proxy.stores.rollups``: monthly
for the whole months of the range, daily for the rest, kept by the ledger
in the transaction that inserts the usage rows), so it keeps working after
raw partitions are dropped. ``user`` and ``tag`` are not in
the rollups (unbounded cardinality): those read the raw ``usage_events``
rows of the range, so they cover only what retention has kept. Raw rows
are partitioned by the month a request was admitted in but reported, like
the rollups, by the day it was written: a request in flight across the
midnight that starts the range is in its previous month's partition, so
that partition is read too (requests never run for a day).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

import asyncpg

from proxy.stores import rollups

GROUPS = ("day", "model", "key", "tenant", "user", "tag")
FIELDS = rollups.FIELDS
_DETAIL = (
    "CASE WHEN jsonb_typeof(e.details -> '{0}') = 'number'"
    " THEN (e.details ->> '{0}')::numeric::bigint ELSE 0 END"
)
_RAW_SUMS = (
    "count(*), count(*) FILTER (WHERE e.status >= 400), count(*) FILTER (WHERE e.cached),"
    " coalesce(sum(e.prompt_tokens), 0), coalesce(sum(e.completion_tokens), 0),"
    f" coalesce(sum({_DETAIL.format('cached_tokens')}), 0),"
    f" coalesce(sum({_DETAIL.format('reasoning_tokens')}), 0),"
    " coalesce(sum(e.cost_usd), 0), count(*) FILTER (WHERE e.cost_usd IS NULL)"
)
_RAW_GROUP = {
    "user": ("coalesce(e.end_user, '')", ""),
    # Each x-tollway-tags tag, and each metadata pair as key=value.
    "tag": (
        "g.tag",
        " CROSS JOIN LATERAL (SELECT jsonb_array_elements_text(coalesce(e.tags -> 'tags', '[]'))"
        " UNION ALL SELECT k || '=' || v FROM jsonb_each_text(coalesce(e.tags -> 'metadata',"
        " '{}'::jsonb)) AS m(k, v)) AS g(tag)",
    ),
}
_RAW = """
SELECT {group} AS grp, {sums}
FROM usage_events e JOIN tenants t ON t.id = e.tenant_id{join}
WHERE e.period BETWEEN date_trunc('month', $4::date - 1)::date AND $5
  AND (e.created_at AT TIME ZONE 'UTC')::date BETWEEN $4 AND $5
  AND ($1::text IS NULL OR t.name = $1)
  AND ($2::text IS NULL OR e.key_id = $2)
  AND ($3::text IS NULL OR e.public_model = $3
       OR coalesce(e.provider_model, e.public_model) = $3)
GROUP BY 1 ORDER BY 1
"""


@dataclass(frozen=True, slots=True)
class UsageQuery:
    start: date
    end: date  # inclusive
    group_by: str = "day"
    tenant: str | None = None
    key: str | None = None
    model: str | None = None


async def report(pool: asyncpg.Pool, q: UsageQuery) -> list[dict[str, Any]]:
    if q.group_by in rollups.GROUPS:
        sql, args = rollups.query(q.group_by, q.start, q.end, q.tenant, q.key, q.model)
        rows = await pool.fetch(sql, *args)
    else:
        group, join = _RAW_GROUP[q.group_by]
        sql = _RAW.format(group=group, sums=_RAW_SUMS, join=join)
        rows = await pool.fetch(sql, q.tenant, q.key, q.model, q.start, q.end)
    return [_row(q.group_by, r) for r in rows]


def _row(group_by: str, r: asyncpg.Record) -> dict[str, Any]:
    out: dict[str, Any] = {group_by: r["grp"]}
    for i, name in enumerate(FIELDS, start=1):
        value = r[i] or 0
        out[name] = f"{Decimal(value):.8f}" if name == "cost_usd" else int(value)
    return out


class BadQuery(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def query_from(params: dict[str, str | None], today: date) -> UsageQuery:
    """A report's filters as a client wrote them (``from``/``to``: ISO days,
    inclusive; by default this month up to today)."""
    group = params.get("group_by") or "day"
    if group not in GROUPS:
        raise BadQuery(f"'group_by' must be one of {', '.join(GROUPS)}.", "group_by")
    start = _day(params.get("from"), "from") or today.replace(day=1)
    end = _day(params.get("to"), "to") or today
    if end < start:
        raise BadQuery("'to' must not be before 'from'.", "to")
    return UsageQuery(
        start,
        end,
        group,
        params.get("tenant") or None,
        params.get("key") or None,
        params.get("model") or None,
    )


def _day(value: str | None, name: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise BadQuery(f"'{name}' must be a day as YYYY-MM-DD.", name) from None
