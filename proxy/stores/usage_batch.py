"""One batch of usage rows into Postgres: the row, its JSON forms, the SQL
and the transaction that writes it (``write_batch``).

The batch is one statement (``_WRITE``): the events inserted ``ON CONFLICT
DO NOTHING`` (unique by period and the event id drawn at admission), and
only the rows actually inserted move the quota and budget counters and the
rollups, so a batch written twice (a retry, a spool replay, a crash
journal's replay) bills once. The keys' last use, the leases and the
alerts follow as later statements of the same transaction, after the
counters (the lock order every lease take uses too), all in one call of
``tollway_write_usage`` (migrations 0012, 0013): one round trip a batch.
``write_isolating`` splits a batch around the rows Postgres
refuses for their content. ``proxy.stores.ledger`` queues and flushes the
rows; ``proxy.stores.spool`` keeps the batches Postgres could not take.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from proxy.stores.dead_letter import is_refusal
from proxy.stores.rollups import FIELDS

COLUMNS = (
    "period",
    "event_id",
    "request_id",
    "tenant_id",
    "key_id",
    "worker_id",
    "endpoint",
    "public_model",
    "provider",
    "provider_model",
    "prompt_tokens",
    "completion_tokens",
    "usage_source",
    "counted",
    "cached",
    "stream",
    "client_disconnected",
    "status",
    "error_code",
    "latency_ms",
    "ttft_ms",
    "attempts",
    "cost_usd",
    "details",
    "end_user",
    "tags",
    "client_ip",
)
_TYPES = (
    "date",
    "text",
    "text",
    "bigint",
    "text",
    "text",
    "text",
    "text",
    "text",
    "text",
    "bigint",
    "bigint",
    "text",
    "bool",
    "bool",
    "bool",
    "bool",
    "int",
    "text",
    "real",
    "real",
    "int",
    "numeric",
    "jsonb",
    "text",
    "jsonb",
    "text",
)
# A batch reaches Postgres as one jsonb parameter, each row an array
# ``[[...COLUMNS], leased, budget_day, budget_leased]`` (``batch_json``),
# unpacked here by position. Not one array per column: asyncpg checks every
# element of an array parameter for nesting (an ABC isinstance per value),
# which cost more than the rest of the row's billing. Not orjson's own
# writing of the ``UsageRow`` dataclass either: that is ~3x the arrays.
_FIELDS = ", ".join(
    f"r->0->>{i} AS {name}" if t == "text" else f"(r->0->>{i})::{t} AS {name}"
    for i, (name, t) in enumerate(zip(COLUMNS, _TYPES, strict=True))
)
_ROWS = (
    f"SELECT {_FIELDS}, (r->>1)::bool AS leased, (r->>2)::date AS bday,"
    " (r->>3)::bool AS bleased FROM jsonb_array_elements($1::jsonb) AS e(r)"
)
# Cached and reasoning token counts, as the provider reported them (details).
_DETAIL = (
    "CASE WHEN jsonb_typeof(r.details -> '{0}') = 'number'"
    " THEN (r.details ->> '{0}')::numeric::bigint ELSE 0 END"
)
# The rollups' summed columns (``rollups.FIELDS``, which reports read), and
# what each one sums over the rows a batch inserted, in the same order.
_COLUMNS = ", ".join(FIELDS)
_SUMS = f"""count(*) AS requests, count(*) FILTER (WHERE r.status >= 400) AS errors,
           count(*) FILTER (WHERE r.cached) AS cache_hits,
           sum(r.prompt_tokens) AS prompt_tokens, sum(r.completion_tokens) AS completion_tokens,
           sum({_DETAIL.format("cached_tokens")}) AS cached_tokens,
           sum({_DETAIL.format("reasoning_tokens")}) AS reasoning_tokens,
           coalesce(sum(r.cost_usd), 0) AS cost_usd,
           count(*) FILTER (WHERE r.cost_usd IS NULL) AS unpriced"""
_ADDED = ", ".join(f"{c} = u.{c} + excluded.{c}" for c in FIELDS)
_FINE_COLUMNS = ", ".join(f"f.{c}" for c in FIELDS)


# The rows a batch inserted, summed once per tenant, key, public model,
# provider and served model (``fine``): every rollup is a sum of these
# groups, so the batch's rows are read for the rollups once, not once per
# rollup table (four scans of the batch were ~17 µs of Postgres's CPU per
# row, ``bench/usage_write.py``).
_FINE = f"""
    SELECT r.tenant_id, coalesce(r.key_id, '') AS key_id,
           coalesce(r.public_model, '') AS public_model, coalesce(r.provider, '') AS provider,
           coalesce(r.provider_model, r.public_model, '') AS served_model,
           {_SUMS}
    FROM rows r JOIN ins USING (period, event_id)
    WHERE r.tenant_id IS NOT NULL
    GROUP BY 1, 2, 3, 4, 5"""
_FINE_SUMS = ", ".join(f"sum(f.{c})" for c in FIELDS)


def _rollup(table: str, at: str, when: str) -> str:
    """The upsert of one rollup table (daily or monthly) from the rows ``ins``
    inserted (``fine``'s groups), keyed by ``at`` = ``when`` (the UTC day or
    month they are written)."""
    return f"""
    INSERT INTO {table} AS u ({at}, tenant_id, key_id, public_model, provider, served_model,
                              {_COLUMNS})
    SELECT {when}, f.tenant_id, f.key_id, f.public_model, f.provider, f.served_model,
           {_FINE_COLUMNS}
    FROM fine f
    ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT ({at}, tenant_id, key_id, public_model, provider, served_model) DO UPDATE
    SET {_ADDED}
    RETURNING 1"""


def _tenant_rollup() -> str:
    """The upsert of ``usage_tenant_daily``: the daily sums per tenant alone
    (what an unfiltered ``group_by=day`` report reads), from the same rows."""
    return f"""
    INSERT INTO usage_tenant_daily AS u (day, tenant_id, {_COLUMNS})
    SELECT (now() AT TIME ZONE 'UTC')::date, f.tenant_id,
           {_FINE_SUMS}
    FROM fine f
    GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (tenant_id, day) DO UPDATE
    SET {_ADDED}
    RETURNING 1"""


def _model_rollup() -> str:
    """The upsert of ``usage_model_daily``: the daily sums per tenant and
    model, each row counted once under each distinct name among its public
    and served model (what a ``group_by=day`` report filtered to a model
    reads; ``fine`` groups by both names, so each group's rows share them)."""
    return f"""
    INSERT INTO usage_model_daily AS u (day, tenant_id, model, {_COLUMNS})
    SELECT (now() AT TIME ZONE 'UTC')::date, f.tenant_id, m.model,
           {_FINE_SUMS}
    FROM fine f
    CROSS JOIN LATERAL (SELECT f.public_model UNION SELECT f.served_model) AS m(model)
    GROUP BY 1, 2, 3 ORDER BY 3, 2, 1
    ON CONFLICT (model, tenant_id, day) DO UPDATE
    SET {_ADDED}
    RETURNING 1"""


# One statement per batch. Only the rows it inserts (``ins``) move anything:
# the quota counters, the budget counters (spend of every tenant and key, per
# month and per UTC day, in micro-dollars rounded up per row) and the daily,
# monthly, per-tenant daily and per-model daily rollups (by the day and month the row is
# written, those of its created_at).
# It returns what the statements after it need: ``q`` rows (quota leases to
# shrink), ``b`` rows (budget leases to shrink), ``a`` rows (budgets that
# crossed an alert threshold in this batch).
# Not sent as is: it is the first statement of ``tollway_write_usage``
# (migration 0013), which a test checks word for word; a change here needs a
# migration that replaces that function.
_WRITE = f"""
WITH rows AS (
    {_ROWS}
), ins AS (
    INSERT INTO usage_events ({", ".join(COLUMNS)})
    SELECT {", ".join(COLUMNS)} FROM rows
    ON CONFLICT DO NOTHING
    RETURNING period, event_id
), agg AS (
    SELECT r.tenant_id, r.period, r.worker_id,
           count(*) AS n, sum(r.prompt_tokens + r.completion_tokens) AS t,
           count(*) FILTER (WHERE r.leased) AS ln,
           coalesce(sum(r.prompt_tokens + r.completion_tokens) FILTER (WHERE r.leased), 0) AS lt
    FROM rows r JOIN ins USING (period, event_id)
    WHERE r.counted AND r.tenant_id IS NOT NULL
    GROUP BY r.tenant_id, r.period, r.worker_id
), counters AS (
    INSERT INTO quota_counters AS q (tenant_id, period, requests_used, tokens_used)
    SELECT tenant_id, period, sum(n), sum(t) FROM agg
    GROUP BY tenant_id, period ORDER BY tenant_id, period
    ON CONFLICT (tenant_id, period) DO UPDATE
    SET requests_used = q.requests_used + excluded.requests_used,
        tokens_used = q.tokens_used + excluded.tokens_used
    RETURNING 1
), spend AS (
    SELECT x.subject, x.span, x.at AS period, r.worker_id, r.bleased,
           ceil(r.cost_usd * 1000000)::bigint AS micros
    FROM rows r JOIN ins USING (period, event_id)
    CROSS JOIN LATERAL (VALUES
        ('t:' || r.tenant_id, 'month', r.period),
        ('t:' || r.tenant_id, 'day', coalesce(r.bday, (now() AT TIME ZONE 'UTC')::date)),
        ('k:' || r.key_id, 'month', r.period),
        ('k:' || r.key_id, 'day', coalesce(r.bday, (now() AT TIME ZONE 'UTC')::date))
    ) AS x(subject, span, at)
    WHERE r.counted AND r.cost_usd > 0 AND r.tenant_id IS NOT NULL AND x.subject IS NOT NULL
), spent AS (
    INSERT INTO budget_counters AS b (subject, span, period, used_micros)
    SELECT subject, span, period, sum(micros) FROM spend
    GROUP BY subject, span, period ORDER BY subject, span, period
    ON CONFLICT (subject, span, period) DO UPDATE
    SET used_micros = b.used_micros + excluded.used_micros
    RETURNING subject, span, period, used_micros, limit_micros, alerted
), fine AS ({_FINE}
), rolled AS ({_rollup("usage_daily", "day", "(now() AT TIME ZONE 'UTC')::date")}
), rolled_monthly AS ({
    _rollup("usage_monthly", "month", "date_trunc('month', now() AT TIME ZONE 'UTC')::date")
}
), rolled_tenant AS ({_tenant_rollup()}
), rolled_model AS ({_model_rollup()}
)
SELECT 'q' AS kind, worker_id, tenant_id, NULL::text AS subject, NULL::text AS span, period,
       ln AS a, lt AS b, (SELECT count(*) FROM counters) + (SELECT count(*) FROM rolled)
       + (SELECT count(*) FROM rolled_monthly) + (SELECT count(*) FROM rolled_tenant)
       + (SELECT count(*) FROM rolled_model) AS c
FROM agg WHERE ln > 0
UNION ALL
SELECT 'b', worker_id, NULL, subject, span, period, sum(micros), 0, 0
FROM spend WHERE bleased GROUP BY worker_id, subject, span, period
UNION ALL
SELECT 'a', NULL, NULL, subject, span, period, used_micros, limit_micros, alerted
FROM spent WHERE tollway_budget_level(used_micros, limit_micros) > alerted
"""
# The whole batch in one round trip: ``tollway_write_usage`` (migration
# 0013) runs ``_WRITE`` (the text above, which a test checks it holds), then
# the keys' last use, the quota and budget leases (counter rows locked before
# lease rows: the order every lease take uses, so the two cannot deadlock)
# and the thresholds announced, as separate statements in that order, and
# returns ``_WRITE``'s rows. One statement, so its own transaction: no BEGIN
# and COMMIT round trips either.
_CALL = "SELECT * FROM tollway_write_usage($1::jsonb, $2::text[])"


@dataclass(slots=True)
class UsageRow:
    values: tuple[Any, ...]  # in COLUMNS order
    leased: bool
    # The UTC day its USD budgets were reserved on (None: now), and whether
    # this worker's budget leases hold its reservation.
    budget_day: date | None = None
    budget_leased: bool = False

    def to_json(self) -> bytes:
        obj: dict[str, Any] = {"v": [_jsonable(v) for v in self.values], "l": self.leased}
        if self.budget_day is not None:
            obj["bd"], obj["bl"] = self.budget_day.isoformat(), self.budget_leased
        return orjson.dumps(obj)

    @classmethod
    def from_json(cls, line: bytes) -> UsageRow:
        obj = orjson.loads(line)
        v = list(obj["v"])
        # A row spooled by an older version lacks the columns added since.
        v += [None] * (len(COLUMNS) - len(v))
        v[0] = date.fromisoformat(v[0])
        v[_COST] = None if v[_COST] is None else Decimal(v[_COST])
        day = date.fromisoformat(obj["bd"]) if obj.get("bd") else None
        return cls(tuple(v), bool(obj["l"]), day, bool(obj.get("bl")))


@dataclass(frozen=True, slots=True)
class Crossing:
    """A budget that reached an alert threshold (50, 80 or 100 percent)."""

    subject: str  # 't:<tenant id>' or 'k:<key id>'
    span: str  # 'month' or 'day'
    period: date
    used_micros: int
    limit_micros: int
    level: int


_COST = COLUMNS.index("cost_usd")
_KEY = COLUMNS.index("key_id")
_CHUNK = 1000  # rows per transaction when replaying a spool


def batch_json(rows: list[UsageRow]) -> str:
    """The rows as ``_ROWS`` reads them: one C call for the whole batch.
    A value JSON cannot hold (a lone surrogate, an int beyond 64 bits)
    raises ``orjson.JSONEncodeError``, a ``TypeError``: a refusal, as
    asyncpg's own encoding errors were (``dead_letter.is_refusal``)."""
    arrays = [(r.values, r.leased, r.budget_day, r.budget_leased) for r in rows]
    return orjson.dumps(arrays, default=_decimal).decode()


def _decimal(value: Any) -> str:
    """orjson's hook for what it does not write itself: a cost, exactly."""
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"a usage row cannot hold a {type(value).__name__}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


async def write_batch(
    pool: asyncpg.Pool, rows: list[UsageRow], alerts: list[Crossing] | None = None
) -> None:
    """One transaction: the rows, counters, rollups, keys and leases, in one
    call. Budgets that crossed a threshold are appended to ``alerts`` (once
    committed)."""
    keys = sorted({row.values[_KEY] for row in rows if row.values[_KEY] is not None})
    out = await pool.fetch(_CALL, batch_json(rows), keys)
    if alerts is not None:
        alerts.extend(c for r in out if r["kind"] == "a" for c in _crossings(r))


def _crossings(r: asyncpg.Record) -> list[Crossing]:
    """Every threshold passed since the last one announced (a batch may pass two)."""
    used, limit, alerted = r["a"], r["b"], r["c"]
    return [
        Crossing(r["subject"], r["span"], r["period"], used, limit, p)
        for p in (50, 80, 100)
        if alerted < p and used * 100 >= limit * p
    ]


Refused = list[tuple[UsageRow, BaseException]]


async def write_isolating(
    pool: asyncpg.Pool,
    rows: list[UsageRow],
    refused: Refused,
    alerts: list[Crossing] | None = None,
) -> None:
    """``write_batch``, except that rows Postgres refuses for their content
    are collected in ``refused`` while all the others are written.

    A refusal splits the batch in halves, each written on its own, so k bad
    rows among n cost about k * log2(n) extra transactions and nothing when
    there are none. Any other error propagates (the caller spools): halves
    already written are then written again on replay, which the
    (period, event_id) key makes harmless."""
    try:
        await write_batch(pool, rows, alerts)
    except Exception as exc:
        if not is_refusal(exc):
            raise
        if len(rows) == 1:
            refused.append((rows[0], exc))
            return
        half = len(rows) // 2
        await write_isolating(pool, rows[:half], refused, alerts)
        await write_isolating(pool, rows[half:], refused, alerts)
