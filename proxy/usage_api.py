"""``GET /v1/usage`` — the calling key's standing: hour window and month."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from proxy import key_limits
from proxy.billing import tier_of
from proxy.errors import InvalidRequest
from proxy.quota import period_end, period_of
from proxy.state import AUTH_GUARD, BILLING, CONFIG, LIMITER


def _counter(used: int, limit: int | None) -> dict[str, Any]:
    return {
        "used": used,
        "limit": limit,
        "remaining": None if limit is None else max(0, limit - used),
    }


async def usage(request: web.Request) -> web.Response:
    billing = request.app.get(BILLING)
    if billing is None:
        raise InvalidRequest("Usage is only tracked when API keys are enabled (auth: keys).")
    config = request.app[CONFIG].current.config
    app = request.app
    who = await app[AUTH_GUARD].authenticate(request, billing.auth, app[LIMITER], config)
    tier = tier_of(config, who)
    hour = await key_limits.hour_window(request.app[LIMITER], config, who.key_id, tier)
    await billing.ledger.flush()  # include this worker's just-finished requests
    now = billing.quota.clock()
    period = period_of(now)
    row = await billing.auth.pool.fetchrow(
        "SELECT requests_used, tokens_used FROM quota_counters"
        " WHERE tenant_id = $1 AND period = $2",
        who.tenant_id,
        period,
    )
    used_r, used_t = (row["requests_used"], row["tokens_used"]) if row else (0, 0)
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
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")
