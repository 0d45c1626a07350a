"""``GET /v1/usage`` — the calling key's standing: hour window and month."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from aiohttp import web

from proxy.config.budgets import usd
from proxy.config.tiers import Tier
from proxy.core.errors import InvalidRequest
from proxy.core.principal import Principal
from proxy.pipeline.runtime import PRINCIPAL
from proxy.stages.admit import key_limits
from proxy.stages.admit.billing import Billing, tier_of
from proxy.stages.admit.budget import limits_for
from proxy.stores.budgets import resets_at
from proxy.stores.quota import period_end, period_of
from proxy.web.keys import BILLING, CONFIG, LIMITER


def _counter(used: int, limit: int | None) -> dict[str, Any]:
    return {
        "used": used,
        "limit": limit,
        "remaining": None if limit is None else max(0, limit - used),
    }


async def _budgets(
    billing: Billing, who: Principal, tier: Tier, now: datetime
) -> list[dict[str, Any]]:
    """The caller's USD budgets: settled spend against each limit."""
    if billing.budgets is None:
        return []
    out = []
    for limit in limits_for(who, tier, now):
        spent = await billing.budgets.spent(limit.subject, limit.span, limit.period)
        out.append(
            {
                "budget": limit.label,
                "scope": "tenant" if limit.subject.startswith("t:") else "key",
                "span": limit.span,
                "period": limit.period.isoformat(),
                "spent_usd": usd(spent),
                "limit_usd": usd(limit.micros),
                "remaining_usd": usd(max(0, limit.micros - spent)),
                "resets_at": resets_at(limit).isoformat().replace("+00:00", "Z"),
            }
        )
    return out


async def usage(request: web.Request) -> web.Response:
    billing = request.app.get(BILLING)
    if billing is None:
        raise InvalidRequest("Usage is only tracked when API keys are enabled (auth: keys).")
    who = request.get(PRINCIPAL)
    if who is None:
        raise InvalidRequest("Usage is only tracked when API keys are enabled (auth: keys).")
    config = request.app[CONFIG].current.config
    tier = tier_of(config, who)
    hour = await key_limits.hour_window(request.app[LIMITER], config, who.key_id, tier)
    await billing.ledger.flush()  # include this worker's just-finished requests
    now = billing.quota.clock()
    period = period_of(now)
    used_r, used_t = await billing.quota.used(who.tenant_id, period)
    body = {
        "object": "usage",
        "tenant": who.tenant,
        "key_id": who.key_id,
        "tier": tier.name,
        "hour": hour,  # the key's sliding hourly window (resets_at: when remaining next grows)
        "month": {
            "period": period.strftime("%Y-%m"),
            "requests": _counter(used_r, tier.monthly_requests),
            "tokens": _counter(used_t, tier.monthly_tokens),
            "resets_at": period_end(period).isoformat().replace("+00:00", "Z"),
        },
        "budgets": await _budgets(billing, who, tier, now),
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")
