"""Who a request is billed to: what authentication found for its API key."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from proxy.config.budgets import Overrides


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    key_prefix: str
    tenant_id: int
    tenant: str
    tier: str
    expires_at: datetime | None
    budgets: Overrides = ()  # the tenant's and key's own USD budgets, over the tier's
    # What admission derives from this key and a tier and would otherwise
    # rebuild per request (the rate-limit keys, the budget limits), by the
    # stage that derives it. It lives as long as this object: the key cache
    # makes a new one on each lookup, so a revocation or a tier change
    # reaches it within ``key_cache_ttl_s``, as it reaches the key itself;
    # a config reload brings new ``Tier`` objects, which each entry checks.
    memo: dict[str, object] = field(
        default_factory=dict, compare=False, hash=False, repr=False, kw_only=True
    )
