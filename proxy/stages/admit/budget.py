"""The admit stage's USD budgets: reserve a request's maximum cost, or refuse it.

The maximum cost is priced at the most expensive target the request could be
served by: every target in its plan (fallbacks and context-window fallbacks
included) and its public model's own price, each at
``prompt estimate x max(prompt, cache_write price) + completion budget x
max(completion, reasoning price)``. The completion budget is the limit the
request goes out with (the client's, capped by the tier, or the tier's cap),
times ``n``. A plan whose targets have no price reserves one micro-dollar
(and is charged nothing: its cost is unknown, see ``proxy.core.pricing``),
so a budget that is used up refuses every request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from proxy.config.budgets import Budgets, effective
from proxy.config.tiers import RATE_SCALE, Price, Prices, Tier, price_for, served_price
from proxy.core import tokens
from proxy.core.principal import Principal
from proxy.providers.base import GENERATIVE
from proxy.stages.route import RoutePlan
from proxy.stores.budgets import BudgetBook, Hold, Limit

_LIMITS = ("max_tokens", "max_completion_tokens")


_DAY = 86_400


def limits_for(who: Principal, tier: Tier, now: datetime) -> tuple[Limit, ...]:
    """Every budget that applies to the caller right now (none: empty).
    Kept on the key's cached principal (``Principal.memo``) for the tier's
    budgets object and the day, so a request does not rebuild the Limits
    (nor format their labels) nor hash the principal to find them."""
    return day_limits(who, tier, now).limits


def day_limits(who: Principal, tier: Tier, now: datetime) -> DayLimits:
    """``limits_for`` with its day and bounds: the memo entry itself."""
    day = now.date()
    budgets = tier.budgets
    memo = who.memo.get("budgets")
    if isinstance(memo, DayLimits) and memo.budgets is budgets and memo.day == day:
        return memo
    return _keep(who, budgets, day)


def limits_at(who: Principal, tier: Tier, t: float) -> DayLimits:
    """``limits_for`` the UTC instant ``t`` (seconds since the epoch, as
    ``time.time()``), with its day and the day's bounds: the memo entry
    itself, found by ``t`` against those bounds, so the admit stage's fast
    path builds no datetime per request (and, keeping the entry, can tell
    by ``t`` alone that it is still the day's)."""
    memo = who.memo.get("budgets")
    if isinstance(memo, DayLimits) and memo.holds(tier.budgets, t):
        return memo
    return _keep(who, tier.budgets, datetime.fromtimestamp(t, UTC).date())


@dataclass(frozen=True, slots=True)
class DayLimits:
    """``limits_for``'s memo entry: the limits of a tier's budgets (and the
    key's overrides) for a UTC day, and the day's bounds in epoch seconds
    (UTC days are whole multiples of 86,400 s). The limits of one principal
    and budgets object for an instant inside the bounds are always these."""

    budgets: Budgets
    day: date
    limits: tuple[Limit, ...]
    start: float
    end: float

    def holds(self, budgets: Budgets, t: float) -> bool:
        """Whether these are the limits of ``budgets`` at the instant ``t``
        (``time.time()``): the same budgets object, ``t`` inside the day."""
        return self.budgets is budgets and self.start <= t < self.end


def _keep(who: Principal, budgets: Budgets, day: date) -> DayLimits:
    start = float(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())
    kept = DayLimits(budgets, day, _build_limits(who, budgets, day), start, start + _DAY)
    who.memo["budgets"] = kept
    return kept


def _build_limits(who: Principal, tier: Budgets, day: date) -> tuple[Limit, ...]:
    budgets = effective(tier, who.budgets)
    if not budgets.any():
        return ()
    month = date(day.year, day.month, 1)
    tenant, key = f"t:{who.tenant_id}", f"k:{who.key_id}"
    slots = (
        (budgets.tenant_month, tenant, "month", month, f"tenant '{who.tenant}' monthly budget"),
        (budgets.tenant_day, tenant, "day", day, f"tenant '{who.tenant}' daily budget"),
        (budgets.key_month, key, "month", month, f"key {who.key_prefix}… monthly budget"),
        (budgets.key_day, key, "day", day, f"key {who.key_prefix}… daily budget"),
    )
    return tuple(
        Limit(subject, span, period, micros, label)
        for micros, subject, span, period, label in slots
        if micros is not None
    )


def completion_budget(body: Mapping[str, Any], endpoint: str) -> int:
    """The completion limit the request goes out with (admission capped it)."""
    if endpoint not in GENERATIVE:
        return 0
    limit = max((v for k in _LIMITS if isinstance(v := body.get(k), int)), default=0)
    n = body.get("n")
    return limit * (n if isinstance(n, int) and n > 0 else 1)


def max_cost(plan: RoutePlan, prices: Mapping[str, Price], prompt: int, completion: int) -> int:
    """The most the request may cost, in micro-dollars (at least 1), in
    integer arithmetic on each price's ``bound_rates`` (rounded up)."""
    return bound(plan_rates(plan, prices), prompt, completion)


def bound(rates: tuple[tuple[int, int], ...], prompt: int, completion: int) -> int:
    """``max_cost`` for a plan's ``plan_rates``: micro-dollars, at least 1."""
    most = -1
    for per_prompt, per_completion in rates:
        cost = per_prompt * prompt + per_completion * completion
        if cost > most:
            most = cost
    if most <= 0:
        return 1
    return -(-most // RATE_SCALE)  # at least 1: ``most`` > 0 rounds up to 1 or more


_PLANS_KEPT = 1024  # plans whose rates a snapshot's prices remember (most plans are kept)


def plan_rates(plan: RoutePlan, prices: Mapping[str, Price]) -> tuple[tuple[int, int], ...]:
    """The distinct ``bound_rates`` of every price the plan may be billed at:
    its public model's and each target's (fallbacks and context-window
    fallbacks included). Remembered per plan on the snapshot's ``Prices``
    (the router keeps a tier's plan per model), so a request looks up no
    price to bound its cost; empty: no target has a price."""
    memo = prices.plan_rates if isinstance(prices, Prices) else None
    if memo is not None:
        found = memo.get(id(plan))
        if found is not None and found[0] is plan:
            return found[1]
    rates: list[tuple[int, int]] = []
    price = price_for(prices, plan.public_model)
    if price is not None:
        rates.append(price.bound_rates)
    for groups in (plan.groups, plan.overflow):
        for group in groups:
            for t in group.targets:
                price = served_price(prices, t.provider.name, t.model, t.public)
                if price is not None and price.bound_rates not in rates:
                    rates.append(price.bound_rates)
    kept = tuple(rates)
    if memo is not None:
        if len(memo) >= _PLANS_KEPT:
            memo.clear()
        memo[id(plan)] = (plan, kept)
    return kept


@dataclass(frozen=True, slots=True)
class Ask:
    """What a request asks of its budgets when the local leases lack room:
    ``reserve`` asks the store for it (a lease to refill, or a refusal)."""

    limits: tuple[Limit, ...]
    micros: int
    day: date


def take(
    book: BudgetBook,
    who: Principal,
    tier: Tier,
    plan: RoutePlan,
    prices: Mapping[str, Price],
    body: dict[str, Any],
    endpoint: str,
    prompt: int | None,
    now: datetime,
) -> tuple[Hold | None, Ask | None]:
    """The request's maximum cost held from its budgets without a coroutine
    when the local leases have room: (the hold, None), or (None, None) for a
    caller without budgets; else (None, the ask) for ``reserve`` to await."""
    limits = limits_for(who, tier, now)
    if not limits:
        return None, None
    if prompt is None:  # a tier without token limits: no estimate made yet
        # The size-based estimate (never below tiktoken's count), not tiktoken
        # itself: nothing proportional to the prompt runs on the event loop.
        prompt = tokens.estimate_prompt(body, endpoint)
    micros = max_cost(plan, prices, prompt, completion_budget(body, endpoint))
    day = now.date()
    hold = book.take(limits, micros, day)
    return (hold, None) if hold is not None else (None, Ask(limits, micros, day))


async def reserve(book: BudgetBook, ask: Ask) -> Hold:
    """What ``take`` could not hold locally, from the store."""
    return await book.admit(ask.limits, ask.micros, ask.day)
