"""Tiers and prices from the YAML ``tiers:`` and ``prices:`` sections.

A tier sets requests per hour (per key, enforced in Redis), monthly requests
and tokens (per tenant, enforced in Postgres), the models it may use (globs)
and a ``max_tokens`` cap, which is also the completion budget reserved for a
request that does not say ``max_tokens`` itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from typing import Any

from proxy.config.budgets import TIER_KEYS as BUDGET_KEYS
from proxy.config.budgets import Budgets, tier_budgets
from proxy.config.reader import ConfigError, glob_match, mapping

DEFAULT_TIERS: dict[str, dict[str, Any]] = {
    "free": {
        "requests_per_hour": 100,
        "monthly_requests": 3_000,
        "monthly_tokens": 1_000_000,
        "max_tokens": 1_024,
    },
    "pro": {
        "requests_per_hour": 1_000,
        "monthly_requests": 30_000,
        "monthly_tokens": 20_000_000,
        "max_tokens": 4_096,
    },
    "enterprise": {
        "requests_per_hour": 10_000,
        "monthly_requests": 300_000,
        "monthly_tokens": 300_000_000,
        "max_tokens": 16_384,
    },
    "unlimited": {
        "requests_per_hour": 1_000_000,
        "monthly_requests": None,
        "monthly_tokens": None,
        "max_tokens": 32_768,
    },
}


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    requests_per_hour: int | None
    tokens_per_minute: int | None
    monthly_requests: int | None
    monthly_tokens: int | None
    max_tokens: int
    models: tuple[str, ...] = ("*",)
    # Per end user (OpenAI's ``user`` field) of each key, in the key's windows.
    user_requests_per_hour: int | None = None
    user_tokens_per_minute: int | None = None
    budgets: Budgets = field(
        default_factory=Budgets
    )  # USD budgets, micro-dollars (proxy.config.budgets)

    def allows(self, model: str) -> bool:
        # "*" (every shipped tier's default) matches any name: asked a few
        # times per request, it needs no glob.
        return "*" in self.models or any(glob_match(p, model) for p in self.models)


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens of each kind. Cached prompt tokens (read from the
    provider's prompt cache) and cache writes are part of the prompt tokens,
    reasoning tokens part of the completion tokens, as OpenAI reports them;
    each kind without its own price costs the price of the part it is in."""

    prompt: Decimal
    completion: Decimal
    cached_prompt: Decimal | None = None
    cache_write: Decimal | None = None
    reasoning: Decimal | None = None
    # The most one prompt / completion token may cost, in millionths of a
    # micro-dollar (rounded up): a budget reservation's bound in integer
    # arithmetic, made once per price instead of in Decimal per request.
    bound_rates: tuple[int, int] = field(init=False, compare=False, repr=False)
    # The zero the three detail terms add when no detail is reported, with
    # their exponent: ``cost``'s short path returns the very same Decimal
    # (digits and scale, which a numeric column keeps) as the long one.
    _no_details: Decimal = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        prompt = max(self.prompt, _or(self.cache_write, self.prompt))
        completion = max(self.completion, _or(self.reasoning, self.completion))
        object.__setattr__(self, "bound_rates", (_pico(prompt), _pico(completion)))
        zero = (
            _or(self.cached_prompt, self.prompt) * 0
            + _or(self.cache_write, self.prompt) * 0
            + _or(self.reasoning, self.completion) * 0
        )
        object.__setattr__(self, "_no_details", zero)

    def cost(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        cached: int = 0,
        cache_write: int = 0,
        reasoning: int = 0,
    ) -> Decimal:
        if not (cached or cache_write or reasoning):  # most requests: two products
            total = self.prompt * prompt_tokens + self.completion * completion_tokens
            return (total + self._no_details) / _MILLION
        # A provider's details never exceed the totals they are part of; if
        # one did, the plain prompt/completion share would go negative.
        cached = min(cached, prompt_tokens)
        cache_write = min(cache_write, prompt_tokens - cached)
        reasoning = min(reasoning, completion_tokens)
        total = (
            self.prompt * (prompt_tokens - cached - cache_write)
            + _or(self.cached_prompt, self.prompt) * cached
            + _or(self.cache_write, self.prompt) * cache_write
            + self.completion * (completion_tokens - reasoning)
            + _or(self.reasoning, self.completion) * reasoning
        )
        return total / _MILLION


# ``/ 1_000_000`` without making the Decimal of the int per request (the same quotient).
_MILLION = Decimal(1_000_000)


def _or(value: Decimal | None, default: Decimal) -> Decimal:
    return default if value is None else value


RATE_SCALE = 1_000_000  # bound_rates are micro-dollars per token x RATE_SCALE


def _pico(usd_per_million: Decimal) -> int:
    """USD per 1M tokens is micro-dollars per token; x RATE_SCALE, rounded up."""
    return int((usd_per_million * RATE_SCALE).to_integral_value(rounding=ROUND_CEILING))


_TIER_KEYS = (
    "requests_per_hour",
    "tokens_per_minute",
    "monthly_requests",
    "monthly_tokens",
    "max_tokens",
    "models",
    "user_requests_per_hour",
    "user_tokens_per_minute",
    *BUDGET_KEYS,
)


def _limit(value: Any, path: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{path}: must be a positive integer or null")
    return value


def _tier(name: str, raw: Any) -> Tier:
    path = f"tiers.{name}"
    mapping(raw, path, _TIER_KEYS)
    models = raw.get("models", ["*"])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise ConfigError(f"{path}.models: must be a list of model names or globs")
    max_tokens = _limit(raw.get("max_tokens", 4096), f"{path}.max_tokens")
    if max_tokens is None:
        raise ConfigError(f"{path}.max_tokens: must be a positive integer")
    return Tier(
        name=name,
        requests_per_hour=_limit(raw.get("requests_per_hour"), f"{path}.requests_per_hour"),
        tokens_per_minute=_limit(raw.get("tokens_per_minute"), f"{path}.tokens_per_minute"),
        monthly_requests=_limit(raw.get("monthly_requests"), f"{path}.monthly_requests"),
        monthly_tokens=_limit(raw.get("monthly_tokens"), f"{path}.monthly_tokens"),
        max_tokens=max_tokens,
        models=tuple(models),
        user_requests_per_hour=_limit(
            raw.get("user_requests_per_hour"), f"{path}.user_requests_per_hour"
        ),
        user_tokens_per_minute=_limit(
            raw.get("user_tokens_per_minute"), f"{path}.user_tokens_per_minute"
        ),
        budgets=tier_budgets(raw, path),
    )


def parse_tiers(raw: Any) -> dict[str, Tier]:
    if raw is None:
        raw = DEFAULT_TIERS
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("tiers: must be a non-empty mapping of name -> tier")
    return {str(name): _tier(str(name), value) for name, value in raw.items()}


_PRICE_KEYS = ("prompt", "completion", "cached_prompt", "cache_write", "reasoning")


def _price(model: str, value: Any) -> Price:
    path = f"prices.{model}"
    if not isinstance(value, dict) or set(value) - set(_PRICE_KEYS):
        raise ConfigError(f"{path}: must be a mapping of {', '.join(_PRICE_KEYS)} (USD per 1M)")
    amounts: dict[str, Decimal] = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise ConfigError(f"{path}.{k}: must be a number >= 0")
        amounts[k] = Decimal(str(v))
    return Price(
        amounts.get("prompt", Decimal(0)),
        amounts.get("completion", Decimal(0)),
        amounts.get("cached_prompt"),
        amounts.get("cache_write"),
        amounts.get("reasoning"),
    )


class Prices(dict[str, Price]):
    """The ``prices:`` table of one config snapshot (never changed after it
    is read), remembering which price each model name resolved to: a name
    that is no key is matched against every glob, which per request (admit's
    budget bound, settle's cost) costs more than the rest of the pricing."""

    __slots__ = ("found", "plan_rates", "served")

    def __init__(self, items: Mapping[str, Price] | None = None) -> None:
        super().__init__(items or {})
        self.found: dict[str, Price | None] = {}
        # ``served_price``'s answers by (provider, provider model, served model):
        # what ``proxy.core.pricing`` asks once per settled request.
        self.served: dict[tuple[str | None, str | None, str | None], Price | None] = {}
        # ``admit.budget.max_cost``'s: a route plan's distinct ``bound_rates``,
        # by the plan's id (the plan kept alongside, so the id is not reused).
        self.plan_rates: dict[int, tuple[Any, tuple[tuple[int, int], ...]]] = {}


_FOUND_MAX = 4096  # names remembered per snapshot; providers may report any model name


def parse_prices(raw: Any) -> Prices:
    if raw is None:
        return Prices()
    if not isinstance(raw, dict):
        raise ConfigError("prices: must be a mapping of model -> {prompt, completion, ...}")
    return Prices({str(model): _price(str(model), value) for model, value in raw.items()})


def price_for(prices: Mapping[str, Price], model: str | None) -> Price | None:
    if model is None:
        return None
    found = prices.get(model)
    if found is not None:
        return found
    memo = prices.found if isinstance(prices, Prices) else None
    if memo is not None and model in memo:
        return memo[model]
    found = next((p for pattern, p in prices.items() if glob_match(pattern, model)), None)
    if memo is not None and len(memo) < _FOUND_MAX:
        memo[model] = found
    return found


def served_price(
    prices: Mapping[str, Price],
    provider: str | None,
    provider_model: str | None,
    served_model: str | None,
) -> Price | None:
    """The price of the model that served: ``provider/model`` first, then the
    provider's model name, then the public model whose target served (the
    requested one, or the fallback that answered: never the requested
    model's price for a fallback's tokens). Each name exact, then by glob."""
    if provider is not None and provider_model is not None:
        for name in (f"{provider}/{provider_model}", provider_model):
            found = price_for(prices, name)
            if found is not None:
                return found
    return price_for(prices, served_model)


@dataclass(frozen=True, slots=True)
class BillingPolicy:
    """``billing:`` — how admission leases quota and how usage is written."""

    # The block of requests one worker leases at once (a busy lease asks for
    # up to 16 blocks: ``lease_pace.MAX_SCALE``; near the limit less, by the
    # 1/8 rule).
    lease_requests: int = 64
    lease_tokens: int = 256_000  # the block of tokens (the same)
    lease_budget_usd: float = 1.0  # the block of a USD budget (the same)
    offline_allowance: int = 0  # requests per worker admitted while Postgres is down
    flush_interval_ms: int = 100  # a usage row waits at most this long for its batch
    key_cache_ttl_s: float = 5.0
    lease_ttl_s: float = 60.0  # leases of a worker silent this long are released
    # Each wait on Postgres a request makes (a connection, then the statement:
    # key lookup, quota lease), and each new connection; read at start.
    db_timeout_s: float = 2.0


_BILLING_KEYS = tuple(BillingPolicy.__dataclass_fields__)


def parse_billing(raw: Any) -> BillingPolicy:
    if raw is None:
        return BillingPolicy()
    if not isinstance(raw, dict):
        raise ConfigError("billing: must be a mapping")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _BILLING_KEYS:
            raise ConfigError(f"billing.{key}: unknown key (allowed: {', '.join(_BILLING_KEYS)})")
        minimum = 0 if key == "offline_allowance" else 1e-9
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            raise ConfigError(f"billing.{key}: must be a number >= {minimum:g}")
        values[key] = value
    return BillingPolicy(**values)
