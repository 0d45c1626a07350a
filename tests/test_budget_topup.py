"""USD budget leases topped up in the background, against a real Postgres:
far from the limit a request finds its lease refilled ahead of need, near it
nothing is leased ahead, and under concurrency with growing top-ups the
budget is still spent exactly to its limit."""

from __future__ import annotations

import uuid
from datetime import date
from functools import partial

import asyncpg
import pytest

from proxy.stores import lease_pace
from proxy.stores.budgets import BudgetBook, Limit
from tests.billing_helpers import admit_in_flight

MONTH = date(2026, 12, 1)


def _limit(micros: int) -> Limit:
    """A tenant's monthly budget of its own (a fresh subject per test)."""
    return Limit(f"t:test-{uuid.uuid4().hex[:8]}", "month", MONTH, micros, "test budget")


async def _held(pg: asyncpg.Pool, limit: Limit) -> tuple[int, int]:
    """(used, leased) micro-dollars of the budget in Postgres."""
    row = await pg.fetchrow(
        "SELECT (SELECT used_micros FROM budget_counters"
        "        WHERE subject = $1 AND span = $2 AND period = $3),"
        " (SELECT sum(micros) FROM budget_leases WHERE subject = $1 AND span = $2 AND period = $3)",
        limit.subject,
        limit.span,
        limit.period,
    )
    assert row is not None
    return int(row[0] or 0), int(row[1] or 0)


async def test_a_budget_far_from_its_limit_is_topped_up_before_a_request_finds_it_empty(
    pg: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lease_pace, "BUSY_S", 3600.0)  # blocks of one size: counted below
    limit = _limit(10_000_000_000)  # $10,000
    book = BudgetBook(pg, "w-btop", 100_000, 2.0)  # blocks of $0.10
    await book.admit((limit,), 10_000, MONTH)  # the first block, on the request path
    for _ in range(200):  # 20 blocks' worth of $0.01 requests
        # The fast path (no await) admits every one: the next block was
        # leased while half of this one was left.
        assert book.take((limit,), 10_000, MONTH) is not None
        await book.settle_top_ups()  # the top-up's round trip, between two requests
    assert book.top_ups >= 19
    assert book.lease_calls == book.top_ups + 1  # only the first on the request path
    used, leased = await _held(pg, limit)
    assert used == 0 and leased >= 201 * 10_000  # every admission came from a leased block


async def test_near_its_limit_nothing_is_leased_ahead(pg: asyncpg.Pool) -> None:
    limit = _limit(400_000)  # under FAR_BLOCKS (8) blocks of $0.10
    book = BudgetBook(pg, "w-bnear", 100_000, 2.0)
    await book.admit((limit,), 10_000, MONTH)  # leases min($0.10, $0.40 / 8) = $0.05
    taken = 1
    while book.take((limit,), 10_000, MONTH) is not None:
        taken += 1
        await book.settle_top_ups()
    assert taken == 5  # the block ran out: the next request refills on the request path
    assert book.top_ups == 0


async def test_the_budget_is_exact_while_top_ups_grow(
    pg: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 clients, two workers' books, 6,400 attempts at $0.01 against $50:
    top-ups grow while far from the limit (busy after 0.01 s here), refills
    on the request path near it; exactly 5,000 are admitted, and Postgres
    leased exactly the limit."""
    monkeypatch.setattr(lease_pace, "BUSY_S", 0.01)
    limit = _limit(50_000_000)
    books = [BudgetBook(pg, f"w-bexact-{i}", 50_000, 2.0) for i in range(2)]
    clients = [
        (partial(book.take, (limit,), 10_000, MONTH), partial(book.admit, (limit,), 10_000, MONTH))
        for book in books * 8
    ]
    admitted, refused = await admit_in_flight(clients, 400, 0.0002, seed=7)
    for book in books:
        await book.settle_top_ups()
    assert admitted == 5_000 and refused == 1_400
    assert sum(book.top_ups for book in books) > 0
    # blocks of $0.05 that never grew would take 1,000 lease calls
    assert sum(book.lease_calls for book in books) < 500  # ~230-330 measured
    used, leased = await _held(pg, limit)
    assert used + leased == 50_000_000  # Postgres leased exactly the limit, no more
