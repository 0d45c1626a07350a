"""USD budgets: the tier's defaults, the per-tenant/per-key overrides, the unit.

Money is counted in integer micro-dollars (``MICROS`` per USD) everywhere a
budget is enforced, so leases, refunds and counters add up exactly. A tier
sets four budgets, all optional (``None``: no budget):

- ``monthly_budget_usd`` / ``daily_budget_usd``: the tenant's spend per UTC
  month / day, all its keys together;
- ``key_monthly_budget_usd`` / ``key_daily_budget_usd``: each key's own.

A tenant (``tenants.budgets``) or a key (``api_keys.budgets``) may override
its own two: ``{"monthly_usd": 25, "daily_usd": null}``; an absent name
keeps the tier's, a null one means "no budget".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from proxy.config.reader import ConfigError

MICROS = 1_000_000
_MICROS = Decimal(MICROS)  # ``to_micros``' factor, made once (it runs per settled request)

TIER_KEYS = (
    "monthly_budget_usd",
    "daily_budget_usd",
    "key_monthly_budget_usd",
    "key_daily_budget_usd",
)
OVERRIDE_KEYS = ("monthly_usd", "daily_usd")
_MAX_USD = Decimal(10) ** 12  # far beyond any budget; keeps micros inside bigint


@dataclass(frozen=True, slots=True)
class Budgets:
    """One caller's budgets in micro-dollars (None: no budget)."""

    tenant_month: int | None = None
    tenant_day: int | None = None
    key_month: int | None = None
    key_day: int | None = None

    def any(self) -> bool:
        values = (self.tenant_month, self.tenant_day, self.key_month, self.key_day)
        return any(v is not None for v in values)


def to_micros(usd: Decimal) -> int:
    """Rounded up: a cost is never charged below what it is."""
    return math.ceil(usd * _MICROS)


def usd(micros: int | None) -> str | None:
    """``12_500_000`` → ``"12.500000"``: exact, for JSON and tables."""
    if micros is None:
        return None
    return f"{Decimal(micros) / MICROS:.6f}"


def parse_usd(value: Any, path: str) -> int | None:
    """A budget as written (number, numeric string or null) in micro-dollars."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{path}: must be a number of USD >= 0, or null")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ConfigError(f"{path}: must be a number of USD >= 0, or null") from None
    if not amount.is_finite() or amount < 0 or amount > _MAX_USD:
        raise ConfigError(f"{path}: must be a number of USD >= 0, or null")
    return to_micros(amount)


def tier_budgets(raw: Mapping[str, Any], path: str) -> Budgets:
    values = [parse_usd(raw.get(k), f"{path}.{k}") for k in TIER_KEYS]
    return Budgets(*values)


def parse_overrides(raw: Any, path: str = "budgets") -> dict[str, int | None]:
    """A tenant's or key's overrides (admin API, CLI, the database column):
    names present map to micro-dollars or None ("no budget")."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be an object with {', '.join(OVERRIDE_KEYS)}")
    for key in raw:
        if key not in OVERRIDE_KEYS:
            raise ConfigError(f"{path}.{key}: unknown budget (allowed: {', '.join(OVERRIDE_KEYS)})")
    return {k: parse_usd(raw[k], f"{path}.{k}") for k in OVERRIDE_KEYS if k in raw}


Overrides = tuple[tuple[str, int | None], ...]
_SPAN = {"monthly_usd": "month", "daily_usd": "day"}


def overrides_of(tenant: Mapping[str, int | None], key: Mapping[str, int | None]) -> Overrides:
    """Both override sets as one hashable tuple for the principal."""
    out = [(f"tenant_{_SPAN[k]}", v) for k, v in tenant.items()]
    out += [(f"key_{_SPAN[k]}", v) for k, v in key.items()]
    return tuple(out)


def effective(tier: Budgets, overrides: Overrides) -> Budgets:
    """The tier's budgets with the tenant's and key's overrides applied."""
    if not overrides:
        return tier
    values = {
        "tenant_month": tier.tenant_month,
        "tenant_day": tier.tenant_day,
        "key_month": tier.key_month,
        "key_day": tier.key_day,
    }
    for name, micros in overrides:
        values[name] = micros
    return Budgets(**values)
