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

from collections.abc import Iterable, Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from proxy.config.budgets import Budgets, effective, to_micros
from proxy.config.tiers import Price, Tier, price_for, served_price
from proxy.core import tokens
from proxy.core.principal import Principal
from proxy.providers.base import GENERATIVE
from proxy.stages.route import RoutePlan, Target
from proxy.stores.budgets import BudgetBook, Hold, Limit

ZERO = Decimal(0)
_LIMITS = ("max_tokens", "max_completion_tokens")


def limits_for(who: Principal, tier: Tier, now: datetime) -> tuple[Limit, ...]:
    """Every budget that applies to the caller right now (none: empty)."""
    budgets: Budgets = effective(tier.budgets, who.budgets)
    if not budgets.any():
        return ()
    month, day = date(now.year, now.month, 1), now.date()
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


def _targets(plan: RoutePlan) -> Iterable[Target]:
    yield from plan.targets
    for group in plan.overflow:
        yield from group.targets


def _bound(price: Price, prompt: int, completion: int) -> Decimal:
    per_prompt = max(price.prompt, price.cache_write or ZERO)
    per_completion = max(price.completion, price.reasoning or ZERO)
    return (per_prompt * prompt + per_completion * completion) / 1_000_000


def max_cost(plan: RoutePlan, prices: Mapping[str, Price], prompt: int, completion: int) -> int:
    """The most the request may cost, in micro-dollars (at least 1)."""
    found = [served_price(prices, t.provider.name, t.model, t.public) for t in _targets(plan)]
    found.append(price_for(prices, plan.public_model))
    bounds = [_bound(p, prompt, completion) for p in found if p is not None]
    return max(1, to_micros(max(bounds))) if bounds else 1


async def reserve(
    book: BudgetBook,
    who: Principal,
    tier: Tier,
    plan: RoutePlan,
    prices: Mapping[str, Price],
    body: dict[str, Any],
    endpoint: str,
    prompt: int | None,
    now: datetime,
) -> Hold | None:
    """Reserve the request's maximum cost from its budgets (None: it has none)."""
    limits = limits_for(who, tier, now)
    if not limits:
        return None
    if prompt is None:  # a tier without token limits: no estimate made yet
        # The size-based estimate (never below tiktoken's count), not tiktoken
        # itself: nothing proportional to the prompt runs on the event loop.
        prompt = tokens.estimate_prompt(body, endpoint)
    micros = max_cost(plan, prices, prompt, completion_budget(body, endpoint))
    return await book.admit(limits, micros, now.date())
