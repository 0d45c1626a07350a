"""Who a request is billed to: what authentication found for its API key."""

from __future__ import annotations

from dataclasses import dataclass
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
