"""The admit stage's per-key rate limit: the tier's requests per hour and
tokens per minute, checked together in one script call (``ratelimit.py``),
or from the worker's lease of both windows' permits without one
(``permits.py``).

It runs after the monthly quota has reserved the request, so a request the
rate limit refuses settles as a 429 and gets its reservation back: no limit
is consumed by a request another limit refused. Tokens per minute count what
a request may use, its prompt estimate plus ``max_tokens`` (OpenAI's own
limiter counts the same way), and are not refunded.

Headers: the ``x-ratelimit-*-requests`` trio reports the hourly window;
``x-ratelimit-*-tokens`` the minute window when the tier sets
``tokens_per_minute`` (else the monthly tokens, see ``billing.py``). With a
sliding window there is no single reset instant: ``reset`` is when the
oldest counted unit leaves the window, i.e. when ``remaining`` next grows.

Per end user: a tier's ``user_requests_per_hour`` / ``user_tokens_per_minute``
limit each value of OpenAI's ``user`` field, per key (the key's application
names its users), in the same script call as the key's own windows (same
hash tag, so the check stays atomic on Redis Cluster; the user is hashed into
the Redis key, so its length and characters do not matter). A request without
``user`` is limited by the key's windows only. The ``x-ratelimit-*`` headers
keep reporting the key's windows; a 429 from a user's window names the user.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from proxy.config.model import Config
from proxy.config.tiers import Tier
from proxy.core.errors import RateLimited, TokenRateLimited
from proxy.core.principal import Principal
from proxy.stages.admit.billing import Admission, reset_duration
from proxy.stores.permits import PermitLeases
from proxy.stores.quota import QuotaBook
from proxy.stores.ratelimit import RateLimiter
from proxy.stores.windows import HOUR_MS, MINUTE_MS, Limit, Verdict, Window

_WHAT = {
    "requests_per_hour": ("requests per hour (RPH)", "requests"),
    "tokens_per_minute": ("tokens per min (TPM)", "tokens"),
    "user_requests_per_hour": ("requests per hour (RPH) per end user", "requests"),
    "user_tokens_per_minute": ("tokens per min (TPM) per end user", "tokens"),
}
_PER_USER = ("user_requests_per_hour", "user_tokens_per_minute")


def instances(config: Config) -> int:
    return config.ratelimit.expected_instances if config.ratelimit else 1


def limits_for(tier: Tier, key_id: str, tokens: int, user: str | None = None) -> list[Limit]:
    tag = f"tw:rl:{{{key_id}}}"  # one Cluster slot per key: the script touches all
    out = []
    if tier.requests_per_hour is not None:
        out.append(Limit(f"{tag}:rph", "requests_per_hour", tier.requests_per_hour, HOUR_MS))
    if tier.tokens_per_minute is not None:
        out.append(
            Limit(f"{tag}:tpm", "tokens_per_minute", tier.tokens_per_minute, MINUTE_MS, tokens)
        )
    if user is not None and (tier.user_requests_per_hour or tier.user_tokens_per_minute):
        u = f"{tag}:u:{hashlib.blake2b(user.encode(), digest_size=12).hexdigest()}"
        if tier.user_requests_per_hour is not None:
            out.append(
                Limit(f"{u}:rph", "user_requests_per_hour", tier.user_requests_per_hour, HOUR_MS)
            )
        if tier.user_tokens_per_minute is not None:
            capacity = tier.user_tokens_per_minute
            out.append(Limit(f"{u}:tpm", "user_tokens_per_minute", capacity, MINUTE_MS, tokens))
    return out


def request_limits(
    who: Principal, tier: Tier, tokens: int, user: str | None = None
) -> Sequence[Limit]:
    """``limits_for`` the request, the key's own windows kept on the key's
    cached principal while its tier is the same object: a request of a
    tier without token windows rebuilds nothing."""
    if tier.tokens_per_minute is not None or (
        user is not None and (tier.user_requests_per_hour or tier.user_tokens_per_minute)
    ):
        return limits_for(tier, who.key_id, tokens, user)  # a cost of its own
    memo = who.memo.get("rate_limits")
    if isinstance(memo, tuple) and memo[0] is tier:
        limits: tuple[Limit, ...] = memo[1]
        return limits
    limits = tuple(limits_for(tier, who.key_id, tokens))
    who.memo["rate_limits"] = (tier, limits)
    return limits


def take(
    limiter: RateLimiter | PermitLeases, admission: Admission, user: str | None = None
) -> tuple[bool, Verdict | None]:
    """``admit`` without a coroutine when the worker's permit lease covers
    the request (or the tier has no window): (True, the verdict or None);
    (False, None) when ``admit`` must be awaited."""
    limits = request_limits(admission.principal, admission.tier, admission.tokens, user)
    if not limits:
        return True, None
    verdict = limiter.take(limits) if isinstance(limiter, PermitLeases) else None
    return verdict is not None, verdict


async def admit(
    limiter: RateLimiter | PermitLeases,
    config: Config,
    admission: Admission,
    user: str | None = None,
) -> Verdict | None:
    """Count the request against its key's windows (and its end user's), or
    raise the 429. With ``PermitLeases`` most requests are admitted from the
    worker's lease, without a Redis round trip (the bound is the same:
    ``permits.py``)."""
    who = admission.principal
    limits = request_limits(who, admission.tier, admission.tokens, user)
    if not limits:
        return None
    verdict = limiter.take(limits) if isinstance(limiter, PermitLeases) else None
    if verdict is None:
        verdict = await limiter.check(limits, instances(config))
    if not verdict.admitted:
        raise refused(verdict, who.key_prefix, user)
    return verdict


# The key's windows' header names: (limit, remaining, reset) per window.
_HEADERS = {
    name: tuple(f"x-ratelimit-{part}-{suffix}" for part in ("limit", "remaining", "reset"))
    for name, (_, suffix) in _WHAT.items()
    if name not in _PER_USER  # the headers describe the key's windows
}
_MONTHLY_TOKENS = _HEADERS["tokens_per_minute"]


def put_window(
    out: dict[str, str], name: str, capacity: str, remaining: int, reset_ms: int
) -> None:
    """One window's trio into ``out`` (the limit already as text); a window
    the headers do not describe (an end user's) adds nothing."""
    names = _HEADERS.get(name)
    if names is not None:
        out[names[0]] = capacity
        out[names[1]] = f"{remaining}"  # ``str()`` of an int, without a type call
        out[names[2]] = reset_duration(reset_ms / 1000)


def put_monthly(
    out: dict[str, str], quota: QuotaBook, tenant_id: int, limit: int, limit_text: str
) -> None:
    """The -tokens trio of the tenant's monthly tokens into ``out`` (the
    limit already as text): ``QuotaBook.standing``'s numbers, without it."""
    remaining, reset = quota.tokens_left(tenant_id, limit)
    out[_MONTHLY_TOKENS[0]] = limit_text
    out[_MONTHLY_TOKENS[1]] = f"{remaining}"  # ``str()`` of an int, without a type call
    out[_MONTHLY_TOKENS[2]] = reset_duration(reset)


def headers(verdict: Verdict | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for w in verdict.windows if verdict is not None else ():
        put_window(out, w.limit.name, str(w.capacity), w.remaining, w.reset_ms)
    return out


def response_headers(
    quota: QuotaBook,
    admission: Admission,
    verdict: Verdict | None,
    out: dict[str, str] | None = None,
) -> dict[str, str]:
    """Every admitted response's ``x-ratelimit-*`` headers: the -requests
    trio is the key's hourly window, the -tokens trio its minute window when
    the tier has one, else the tenant's monthly tokens (``QuotaBook.standing``'s,
    without building it). ``out``: the dict to add them to (a new one)."""
    if out is None:
        out = {}
    tier = admission.tier
    if tier.monthly_tokens is not None:
        limit = tier.monthly_tokens
        put_monthly(out, quota, admission.principal.tenant_id, limit, str(limit))
    for w in verdict.windows if verdict is not None else ():
        put_window(out, w.limit.name, str(w.capacity), w.remaining, w.reset_ms)
    return out


def refused(verdict: Verdict, key_prefix: str, user: str | None = None) -> RateLimited:
    w = verdict.blocking
    assert w is not None
    what = _WHAT[w.limit.name][0]
    tokens = w.limit.name in ("tokens_per_minute", "user_tokens_per_minute")
    cls = TokenRateLimited if tokens else RateLimited
    whose = f"key {key_prefix}..."
    if w.limit.name in _PER_USER and user is not None:
        shown = user if len(user) <= 64 else f"{user[:64]}…"
        whose = f"end user {shown!r} of key {key_prefix}..."
    extra: dict[str, str]
    if w.retry_ms < 0:
        message = (
            f"Request too large for {what} on {whose}: Limit {w.capacity}, "
            f"Requested {w.limit.cost}. Lower max_tokens or the prompt size."
        )
        extra = {"x-should-retry": "false"}
    else:
        wait = math.ceil(w.retry_ms / 1000)
        message = (
            f"Rate limit reached for {whose} on {what}: Limit {w.capacity}, "
            f"Used {w.used}, Requested {w.limit.cost}. "
            f"Please try again in {reset_duration(w.retry_ms / 1000)}."
        )
        extra = {"retry-after": str(max(1, wait)), "retry-after-ms": str(w.retry_ms)}
    return cls(message, headers={**headers(verdict), **extra})


async def hour_window(
    limiter: RateLimiter, config: Config, key_id: str, tier: Tier
) -> dict[str, Any]:
    """The key's hourly window for ``GET /v1/usage``, without counting a request."""
    if tier.requests_per_hour is None:
        return {"requests": {"used": None, "limit": None, "remaining": None}, "resets_at": None}
    verdict = await limiter.check(limits_for(tier, key_id, 0)[:1], instances(config), commit=False)
    w: Window = verdict.windows[0]
    resets_at = None
    if w.used:
        at = datetime.fromtimestamp((verdict.now_ms + w.reset_ms) / 1000, UTC)
        resets_at = at.isoformat(timespec="seconds").replace("+00:00", "Z")
    return {
        "requests": {"used": w.used, "limit": w.capacity, "remaining": w.remaining},
        "resets_at": resets_at,
        "window": "sliding",
    }
