"""Provider limits: what a provider (or one of its models) accepts, shared by
every Tollway instance through the limiter of ``ratelimit.py``.

``ratelimit.providers`` in the YAML sets ``rpm``, ``tpm`` (prompt estimate
plus ``max_tokens``, as OpenAI counts) and ``max_concurrency`` per provider
and per target (``provider/model``); a target must pass both its provider's
limits and its own, in one atomic check. The forward stage asks
``ProviderGate.enter`` before each attempt: over a limit, the target is
skipped and the next one in the route plan is tried; when none is left the
client gets 429 ``provider_rate_limited`` (rpm/tpm, with ``retry-after``) or
503 ``provider_busy`` (concurrency, ``retry-after: 1``). A concurrency slot
is held until the attempt ends, for a stream until it is closed, and frees
itself after the target's ``total`` timeout if its holder died.
"""

from __future__ import annotations

import math
from typing import Any

from proxy.config.model import Config
from proxy.config.ratelimit import ProviderLimit
from proxy.core import tokens
from proxy.core.errors import ProviderBusy, ProviderRateLimited
from proxy.providers.base import Call
from proxy.stages.route import Target
from proxy.stores.ratelimit import RateLimiter
from proxy.stores.windows import MINUTE_MS, Limit, Verdict


class Permit:
    """An admitted attempt's hold on its target's concurrency slots."""

    __slots__ = ("_limiter", "_verdict")

    def __init__(self, limiter: RateLimiter, verdict: Verdict) -> None:
        self._limiter: RateLimiter | None = limiter
        self._verdict = verdict

    def release(self) -> None:
        if self._limiter is not None:
            self._limiter.release(self._verdict)
            self._limiter = None


def _budget(body: dict[str, Any], default: int) -> int:
    asked = body.get("max_completion_tokens", body.get("max_tokens"))
    n = body.get("n")
    return (asked if isinstance(asked, int) else default) * (n if isinstance(n, int) else 1)


class ProviderGate:
    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    @staticmethod
    def limits_any(config: Config) -> bool:
        """Whether the config limits any provider (else ``enter`` admits all)."""
        return bool(config.ratelimit and config.ratelimit.providers)

    def limits_for(self, config: Config, target: Target, call: Call, member: str) -> list[Limit]:
        configured = config.ratelimit.providers if config.ratelimit else {}
        if not configured:
            return []
        name = target.provider.name
        out: list[Limit] = []
        cost: int | None = None
        for scope in (name, target.key):
            spec: ProviderLimit | None = configured.get(scope)
            if spec is None:
                continue
            key = f"tw:pl:{{{name}}}:{scope}"  # one Cluster slot per provider
            if spec.rpm is not None:
                out.append(Limit(f"{key}:rpm", "rpm", spec.rpm, MINUTE_MS))
            if spec.tpm is not None:
                if cost is None:
                    cost = tokens.estimate_prompt(call.body, call.endpoint) + _budget(
                        call.body, target.provider.default_max_tokens
                    )
                out.append(Limit(f"{key}:tpm", "tpm", spec.tpm, MINUTE_MS, cost))
            if spec.max_concurrency is not None:
                lease_ms = int((target.timeouts.total + 5) * 1000)
                out.append(
                    Limit(
                        f"{key}:conc",
                        "max_concurrency",
                        spec.max_concurrency,
                        member=member,
                        lease_ms=lease_ms,
                    )
                )
        return out

    async def enter(self, config: Config, target: Target, call: Call, member: str) -> Permit | None:
        """A permit for one attempt on ``target`` (None: it has no limits), or
        ``ProviderRateLimited``/``ProviderBusy`` when it is over a limit."""
        limits = self.limits_for(config, target, call, member)
        if not limits:
            return None
        instances = config.ratelimit.expected_instances if config.ratelimit else 1
        verdict = await self.limiter.check(limits, instances)
        if verdict.admitted:
            return Permit(self.limiter, verdict)
        w = verdict.blocking
        assert w is not None
        own = w.limit.key.startswith(f"tw:pl:{{{target.provider.name}}}:{target.key}:")
        where = f"target '{target.key}'" if own else f"provider '{target.provider.name}'"
        if w.limit.concurrency:
            raise ProviderBusy(
                f"{where} has {w.capacity} requests in flight, its configured maximum; "
                "retry shortly.",
                headers={"retry-after": "1"},
            )
        per_minute = "requests" if w.limit.name == "rpm" else "tokens"
        wait = max(1, math.ceil(w.retry_ms / 1000)) if w.retry_ms >= 0 else 60
        raise ProviderRateLimited(
            f"{where} is at its configured limit of {w.capacity} {per_minute} per minute; "
            f"retry in {wait}s.",
            headers={"retry-after": str(wait)},
        )
