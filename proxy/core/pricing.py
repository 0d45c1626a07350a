"""What a settled request cost, at the prices of its own config snapshot.

Priced at the model that served (``proxy.config.tiers.served_price``), with
the provider's cached-prompt, cache-write and reasoning counts at their own
prices. ``None`` means "tokens were used and no price is configured": the
usage row stores NULL, never a silent $0. A request that used no tokens
costs 0 whatever its model.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from proxy.config.tiers import Price, Prices, served_price
from proxy.core.record import UsageRecord
from proxy.core.usage import Usage

ZERO = Decimal(0)
_UNSEEN = object()  # no answer kept for this name yet
_SERVED_MAX = 4096  # answers kept per snapshot; providers may report any model name


def cost_of(record: UsageRecord, default: Mapping[str, Price] | None = None) -> Decimal | None:
    """Computed once per record; every settler reads the same answer."""
    if not record.costed:
        prices = record.config.prices if record.config is not None else default or {}
        served = record.served_model or record.public_model  # a cache hit: the public model
        record.cost_usd = price_usage(
            prices, record.usage, record.provider, record.provider_model, served
        )
        record.costed = True
    return record.cost_usd


def price_usage(
    prices: Mapping[str, Price],
    usage: Usage,
    provider: str | None,
    provider_model: str | None,
    served_model: str | None,
) -> Decimal | None:
    prompt, completion = usage.prompt_tokens, usage.completion_tokens
    if prompt + completion == 0:  # ``usage.total_tokens``, without the property's call
        return ZERO
    memo = prices.served if isinstance(prices, Prices) else None
    key = (provider, provider_model, served_model)
    price = memo.get(key, _UNSEEN) if memo is not None else _UNSEEN
    if price is _UNSEEN:
        price = served_price(prices, provider, provider_model, served_model)
        if memo is not None and len(memo) < _SERVED_MAX:
            memo[key] = price
    if not isinstance(price, Price):  # no price configured
        return None
    d = usage.details
    if not d:  # no cached, cache-write or reasoning counts: most answers
        return price.cost(prompt, completion)
    return price.cost(
        prompt,
        completion,
        d.get("cached_tokens", 0),
        d.get("cache_write_tokens", 0),
        d.get("reasoning_tokens", 0),
    )
