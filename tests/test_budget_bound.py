"""A request's maximum cost (``admit.budget.max_cost``): the dearest price
its plan may be billed at, the plan's rates remembered per price table."""

from __future__ import annotations

from proxy.config.providers import ProviderConfig
from proxy.config.tiers import parse_prices
from proxy.stages.admit.budget import max_cost
from proxy.stages.route import RoutePlan, Target, TargetGroup

OPENAI = ProviderConfig("openai", "openai")


def _plan() -> RoutePlan:
    """``chat`` served by a cheap target, falling back to a dear one, with a
    context-window fallback dearer still."""
    cheap = TargetGroup("chat", "ordered", (Target(OPENAI, "small", public="chat"),))
    dear = TargetGroup("big", "ordered", (Target(OPENAI, "large", public="big"),))
    huge = TargetGroup("long", "ordered", (Target(OPENAI, "long-ctx", public="long"),))
    return RoutePlan("chat", (cheap, dear), overflow=(huge,))


def test_the_dearest_target_bounds_the_cost_and_each_price_table_its_own() -> None:
    plan = _plan()
    prices = parse_prices(
        {"small": {"prompt": 1, "completion": 2}, "large": {"prompt": 10, "completion": 20}}
    )
    # 1,000 prompt + 100 completion tokens at $10 / $20 per 1M: 10,000 + 2,000 micro-dollars
    assert max_cost(plan, prices, 1000, 100) == 12_000
    assert max_cost(plan, prices, 1000, 100) == 12_000  # the plan's rates remembered: the same
    assert max_cost(plan, prices, 0, 1_000_000) == 20_000_000  # other sizes, same rates
    dearer = parse_prices({"long-ctx": {"prompt": 30, "completion": 30}, "small": {"prompt": 1}})
    assert max_cost(plan, dearer, 1000, 100) == 33_000  # the overflow's price, in this table
    assert max_cost(plan, parse_prices({}), 1000, 100) == 1  # no price: one micro-dollar
    assert max_cost(_plan(), prices, 2000, 0) == 20_000  # an equal plan, another object
