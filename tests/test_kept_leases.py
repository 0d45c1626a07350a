"""The leases a key's admission object keeps (``KeyAdmission``: the tenant's
quota lease of the month, its budgets' leases of the day) are the stores'
own: a take from them is a take from the store's lease, and one the store
drops from its map (a sweep, ``keep_only``) is never taken from again, nor
given back to: the store's map decides, as for a request that kept nothing."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import yaml

from proxy.config.tiers import BillingPolicy
from proxy.core.principal import Principal
from proxy.core.record import UsageRecord
from proxy.pipeline.registry import parse_config
from proxy.stages.admit import budget, keyed
from proxy.stages.admit.billing import Admission, Billing
from proxy.stages.base import Exchange
from proxy.stages.route import RoutePlan
from proxy.stores.budgets import BudgetBook
from proxy.stores.budgets import _Lease as _BudgetLease
from proxy.stores.permits import PermitLeases
from proxy.stores.permits import _Lease as _PermitLease
from proxy.stores.quota import QuotaBook
from proxy.stores.quota import _Lease as _QuotaLease
from tests.billing_helpers import TEST_TIERS, billing_config

MSG = [{"role": "user", "content": "hello there"}]
TENANT = 5


class _Setup:
    """A budgeted key's admission object on hand-made leases (no queries:
    every take below is answered from a local lease, or refused to ``admit``)."""

    def __init__(self) -> None:
        tiers: dict[str, Any] = {
            **TEST_TIERS,
            "budgeted": {**TEST_TIERS["tiny"], "monthly_budget_usd": 10, "key_daily_budget_usd": 1},
        }
        raw = billing_config("http://127.0.0.1:9")
        raw["tiers"] = tiers
        self.config = config = parse_config(yaml.safe_dump(raw), {})
        self.who = who = Principal("key_kl", "tw-kl", TENANT, "t", "budgeted", None)
        self.quota = QuotaBook(None, "w-kl", BillingPolicy())  # type: ignore[arg-type]
        self.period = self.quota._month()[0]
        self.book = BudgetBook(None, "w-kl", 1000, 2.0)  # type: ignore[arg-type]
        billing = Billing(None, self.quota, None, config.prices, None, self.book)  # type: ignore[arg-type]
        permits = PermitLeases(None)  # type: ignore[arg-type]
        self.key = keyed.of(billing, config, who, permits)
        assert self.key.rate is not None
        hour = self.key.rate[0]
        now = time.monotonic()
        permits._leases[hour.key] = _PermitLease(0, now + 3600, 10**6, 0, 3_600_000, 0, now, 8)
        self.limits = budget.limits_for(who, self.key.tier, self.quota.clock())
        assert len(self.limits) == 2

    def budget_leases(self, micros: int) -> list[_BudgetLease]:
        made = [_BudgetLease(micros=micros) for _ in self.limits]
        for limit, lease in zip(self.limits, made, strict=True):
            self.book._leases[limit.key] = lease
        return made

    def admit(self, i: int) -> keyed.Taken | None:
        record = UsageRecord(f"r{i}", "chat", config=self.config)
        body = {"model": "echo", "messages": MSG}
        ex = Exchange(None, record, self.config, "chat", body, 0.0, who=self.who, model="echo")
        return self.key.take(ex, RoutePlan("echo", ()))


def test_takes_come_from_the_stores_leases() -> None:
    s = _Setup()
    month = s.quota._leases[(TENANT, s.period)] = _QuotaLease(5, 10**6)
    days = s.budget_leases(100)
    for i in range(5):
        taken = s.admit(i)
        assert taken is not None and taken[1:] == (None, True, None)
        admission = taken[0]
        assert isinstance(admission, Admission) and admission.budget is not None
        assert month.requests == 4 - i and days[0].micros == days[1].micros
        assert days[0].micros == 100 - (i + 1) * admission.budget.micros
    assert s.admit(5) is None  # the month's lease is used up: ``admit`` refills it


def test_a_swept_lease_is_neither_taken_from_nor_given_back_to() -> None:
    s = _Setup()
    old_month = s.quota._leases[(TENANT, s.period)] = _QuotaLease(5, 10**6)
    old_days = s.budget_leases(100)
    first = s.admit(0)
    assert first is not None and first[0].budget is not None
    hold = first[0].budget.micros
    assert old_month.requests == 4 and old_days[0].micros == 100 - hold
    # The sweep found this worker's rows gone: the leases are no longer ours.
    s.quota.keep_only(set(), time.monotonic())
    s.book.keep_only(set(), time.monotonic())
    assert not s.quota._leases and not s.book._leases
    assert s.admit(1) is None  # nothing taken from the swept lease: ``admit`` refills
    assert old_month.requests == 4
    # A new lease in the store's map is the one taken from.
    new_month = s.quota._leases[(TENANT, s.period)] = _QuotaLease(3, 10**6)
    taken = s.admit(2)
    assert taken is not None and new_month.requests == 2 and old_month.requests == 4
    assert taken[1] is not None  # no budget lease in the map: the hold is awaited
    new_days = s.budget_leases(50)
    again = s.admit(3)
    assert again is not None and again[1] is None and new_days[0].micros == 50 - hold
    assert old_days[0].micros == 100 - hold  # the swept ones are left alone
    # The first admission settles: what it reserved goes to the map's leases.
    s.quota.release(first[0].reservation, False, 0)
    s.book.release(first[0].budget, 0)
    assert (old_month.requests, new_month.requests) == (4, 2)
    assert [lease.micros for lease in old_days] == [100 - hold] * 2
    assert [lease.micros for lease in new_days] == [50] * 2


def test_at_the_days_end_the_key_takes_from_the_next_days_budgets(monkeypatch: Any) -> None:
    """The key keeps its budgets' day (``budget.limits_at``'s entry) and
    answers from it by the clock against the day's bounds: at the bound, the
    next day's limits are asked for, never the kept day's leases taken from."""
    s = _Setup()
    s.quota._leases[(TENANT, s.period)] = _QuotaLease(10, 10**6)
    today = s.budget_leases(100)
    first = s.admit(0)
    assert first is not None and first[1] is None and first[0].budget is not None
    hold = first[0].budget.micros
    assert s.key.budgeted is not None
    end = s.key.budgeted[0].end
    monkeypatch.setattr(time, "time", lambda: end)  # the first instant of the next day
    taken = s.admit(1)
    assert taken is not None and isinstance(taken[1], budget.Ask)  # no lease of that day yet
    assert taken[1].day == s.key.budgeted[0].day + timedelta(days=1)
    assert [lease.micros for lease in today] == [100 - hold] * 2  # the kept day left alone
    tomorrow = budget.limits_at(s.who, s.key.tier, end)
    assert tomorrow.limits == taken[1].limits and tomorrow.day == taken[1].day
    made = [_BudgetLease(micros=70) for _ in tomorrow.limits]
    for limit, lease in zip(tomorrow.limits, made, strict=True):
        s.book._leases[limit.key] = lease
    again = s.admit(2)
    assert again is not None and again[1] is None and again[0].budget is not None
    assert again[0].budget.day == taken[1].day
    assert [lease.micros for lease in made] == [70 - hold] * 2
    assert s.key.budgeted[0] is tomorrow  # the next day's entry is the one kept now
