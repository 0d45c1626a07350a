"""The SQL of a report over the usage rollups, for a range of days.

The whole calendar months inside the range are read from ``usage_monthly``
and only the partial months at its ends from ``usage_daily`` (a year is then
at most 12 + 60 rows per key x model instead of 365); ``group_by=day`` needs
the days, so it reads ``usage_daily`` alone, or, when no key is asked for,
``usage_tenant_daily`` (one row per tenant and day) or, filtered to a model,
``usage_model_daily`` (one row per tenant, model and day). Each branch is summed in SQL and
the branches summed again, and the query names only the filters that are
set, so each shape gets a plan that uses the tenant's (or key's) index.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

FIELDS = (
    "requests",
    "errors",
    "cache_hits",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_usd",
    "unpriced",
)
# group_by -> (the column each branch groups by, what the report shows for it).
GROUPS = {
    "day": ("u.day", "x.g::text"),
    "model": ("u.served_model", "x.g"),
    "key": ("u.key_id", "x.g"),
    "tenant": ("u.tenant_id", "t.name"),
}
_BRANCH = "SELECT {g} AS g, {sums} FROM {table} u WHERE {where} GROUP BY 1"
_QUERY = """
SELECT {shown} AS grp, {sums}
FROM ({branches}) x{join}
GROUP BY 1 ORDER BY 1
"""


def split(start: date, end: date) -> tuple[list[tuple[date, date]], tuple[date, date] | None]:
    """The day spans to read daily (inclusive) and the months to read monthly
    (first days, inclusive) that together cover ``start``..``end`` once."""
    first = start if start.day == 1 else _next_month(start)
    after = (end + timedelta(days=1)).replace(day=1)  # the month after the last whole one
    if first >= after:
        return [(start, end)], None
    days = [(start, first - timedelta(days=1))] if start < first else []
    if after <= end:
        days.append((after, end))
    return days, (first, _prev_month(after))


def query(
    group_by: str,
    start: date,
    end: date,
    tenant: str | None,
    key: str | None,
    model: str | None,
) -> tuple[str, list[Any]]:
    """The report's SQL and its arguments."""
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    filters = []
    if tenant is not None:
        filters.append(f"u.tenant_id = (SELECT id FROM tenants WHERE name = {arg(tenant)})")
    if key is not None:
        filters.append(f"u.key_id = {arg(key)}")
    daily = None
    if group_by == "day" and key is None:
        daily = "usage_tenant_daily" if model is None else "usage_model_daily"
    if model is not None:
        m = arg(model)
        if daily is None:
            filters.append(f"(u.public_model = {m} OR u.served_model = {m})")
        else:  # its rows under ``model`` are those with either name
            filters.append(f"u.model = {m}")
    if group_by == "day":
        days, months = [(start, end)], None
    else:
        days, months = split(start, end)
    g, shown = GROUPS[group_by]
    sums = ", ".join(f"sum(u.{f}) AS {f}" for f in FIELDS)
    spans = [(daily or "usage_daily", "day", lo, hi) for lo, hi in days]
    if months is not None:
        spans.append(("usage_monthly", "month", *months))
    branches = [
        _BRANCH.format(
            g=g,
            sums=sums,
            table=table,
            where=" AND ".join([f"u.{col} BETWEEN {arg(lo)} AND {arg(hi)}", *filters]),
        )
        for table, col, lo, hi in spans
    ]
    sql = _QUERY.format(
        shown=shown,
        sums=", ".join(f"sum(x.{f})" for f in FIELDS),
        branches=" UNION ALL ".join(branches),
        join=" JOIN tenants t ON t.id = x.g" if group_by == "tenant" else "",
    )
    return sql, args


def _next_month(day: date) -> date:
    return (day.replace(day=28) + timedelta(days=4)).replace(day=1)


def _prev_month(first: date) -> date:
    return (first - timedelta(days=1)).replace(day=1)
