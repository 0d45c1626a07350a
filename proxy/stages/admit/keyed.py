"""One admission object per key: the admit stage's fast path in one call.

Everything admission derives from a key, its tier and the config snapshot
alone is worked out once and kept on the key's cached principal
(``Principal.memo``, as ``key_limits.request_limits`` keeps its limits): the
tier, whether the tier needs a prompt estimate, the key's rate-limit windows,
its USD budget limits for the day, the plan's price bounds, and the header
values that do not change per request (limits as text). ``take`` then admits
a request from the worker's leases in one synchronous call, in the order of
``pipeline.run.admit``: the monthly quota, the budgets, the key's windows.

It stops at the first lease that is short and says where: the pipeline then
awaits the rest exactly as the per-request code does (``run.admit``), so
the semantics, bounds and refusal order are those of the awaited path; a
request the fast path admits is one the awaited path would have admitted
from the same leases without an await. The object lives as long as the
principal (the key cache makes a new one on each lookup, so a revocation or
a tier change reaches it within ``key_cache_ttl_s``) and is rebuilt when
the config snapshot or the billing object changes (a reload).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from proxy.config.model import Config
from proxy.core import ids, tokens
from proxy.core.principal import Principal
from proxy.stages.admit import budget, key_limits
from proxy.stages.admit.billing import (
    Admission,
    Billing,
    clamp_max_tokens,
    needs_estimate,
    reset_text,
    tier_of,
)
from proxy.stages.base import Exchange
from proxy.stages.route import RoutePlan
from proxy.stores.permits import PermitLeases
from proxy.stores.quota import utc_now
from proxy.stores.ratelimit import RateLimiter
from proxy.stores.windows import Limit, Verdict

# A fast ``take`` that stopped short: (the admission, the budget ask to
# await or None, whether the key's windows were decided, their verdict).
Taken = tuple[Admission, budget.Ask | None, bool, Verdict | None]


class KeyAdmission:
    """What admission keeps per (principal, config snapshot, billing)."""

    __slots__ = (
        "billing",
        "config",
        "estimates",
        "hour",
        "limiter",
        "monthly",
        "monthly_text",
        "per_user",
        "rate",
        "rate_text",
        "tier",
        "who",
    )

    def __init__(
        self, billing: Billing, config: Config, who: Principal, limiter: RateLimiter | PermitLeases
    ) -> None:
        tier = tier_of(config, who)  # the 403 of an unknown tier, as before
        self.billing, self.config, self.who, self.tier, self.limiter = (
            billing,
            config,
            who,
            tier,
            limiter,
        )
        self.estimates = needs_estimate(tier)
        self.per_user = bool(tier.user_requests_per_hour or tier.user_tokens_per_minute)
        # The key's own windows when they cost the same for every request
        # (no minute window): kept; else built per request by ``key_limits``.
        self.rate: Sequence[Limit] | None = (
            key_limits.request_limits(who, tier, 0) if tier.tokens_per_minute is None else None
        )
        self.rate_text = str(tier.requests_per_hour)  # the -requests trio's limit
        # The usual case: the kept windows are the hour alone, taken from the
        # worker's permit lease (``PermitLeases.take_one``).
        self.hour: tuple[PermitLeases, Limit] | None = None
        if self.rate is not None and len(self.rate) == 1 and isinstance(limiter, PermitLeases):
            self.hour = (limiter, self.rate[0])
        # the -tokens trio's limit when it reports the month (no minute window)
        self.monthly = tier.monthly_tokens if tier.tokens_per_minute is None else None
        self.monthly_text = str(self.monthly)  # used only when ``monthly`` is set

    def take(self, ex: Exchange, plan: RoutePlan) -> Taken | None:
        """Admit from the leases without a coroutine. None: the quota lease
        is short (nothing taken; ``run.admit`` does it all, as before).
        Otherwise the admission, noted on the record and in the journal as
        soon as it exists (``opened``: whatever happens next, settling gives
        its reservation back), and how far it got: a budget ask to await
        (then the key's windows are not yet counted), or the key's windows
        undecided (``key_limits.admit`` to await)."""
        who, tier, body, endpoint = self.who, self.tier, ex.body, ex.endpoint
        completion = clamp_max_tokens(body, tier, endpoint)
        prompt = tokens.estimate_prompt(body, endpoint) if self.estimates else None
        estimate = prompt + completion if prompt is not None else 0
        billing = self.billing
        quota = billing.quota
        # One reading of the system clock for the quota's month and the
        # budgets' day; another clock is read as ``run.admit`` reads it.
        t = time.time() if quota.clock is utc_now else None
        reservation = quota.take(who, tier, estimate, t)
        if reservation is None:
            return None
        admission = Admission(who, tier, reservation, estimate, ids.event_id(), prompt)
        opened(billing, ex, admission)
        book = billing.budgets
        if book is not None:
            if t is not None:
                limits, day = budget.limits_at(who, tier, t)
            else:
                now = quota.clock()
                limits, day = budget.limits_for(who, tier, now), now.date()
            if limits:
                if prompt is None:  # as ``budget.take``: the size-based estimate
                    prompt = tokens.estimate_prompt(body, endpoint)
                # ``budget.max_cost``: ``completion`` is ``completion_budget``'s
                # value (the limit the body goes out with, clamped above, x n)
                rates = budget.plan_rates(plan, self.config.prices)
                micros = budget.bound(rates, prompt, completion)
                hold = book.take(limits, micros, day)
                if hold is None:
                    return admission, budget.Ask(limits, micros, day), False, None
                admission.budget = hold
        hour, user = self.hour, ex.record.end_user
        if hour is not None and (user is None or not self.per_user):
            # The key's hourly window from the lease: its -requests header
            # trio made from the lease's numbers, no verdict built.
            got = hour[0].take_one(hour[1])
            if got is None:
                return admission, None, False, None
            # ``leased_headers``, inline (one call fewer on every request)
            used, capacity = got[0], hour[1].capacity
            ex.notes[LEASED] = {
                _REQUESTS[0]: self.rate_text,
                _REQUESTS[1]: str(capacity - used if used < capacity else 0),
                _REQUESTS[2]: reset_text(int(got[1] / 1000 + 0.999)),
            }
            return admission, None, True, None
        rate = self.rate
        if rate is None or (user is not None and self.per_user):
            done, verdict = key_limits.take(self.limiter, admission, user)
            return admission, None, done, verdict
        if not rate:
            return admission, None, True, None
        limiter = self.limiter
        verdict = limiter.take(rate) if isinstance(limiter, PermitLeases) else None
        return admission, None, verdict is not None, verdict

    def headers(
        self,
        request_id: str,
        admission: Admission,
        verdict: Verdict | None,
        leased: dict[str, str] | None = None,
    ) -> dict[str, str]:
        """``x-request-id`` and ``key_limits.response_headers``; ``leased``:
        the window's trio ``take`` made from a lease (no verdict). The usual
        block (the month's -tokens trio, the hour's trio from a lease) in one
        dict display, the month's numbers read as ``response_headers`` reads
        them (``QuotaBook.tokens_left``)."""
        monthly = self.monthly
        if verdict is None and monthly is not None and admission.tier is self.tier:
            left, reset = self.billing.quota.tokens_left(admission.principal.tenant_id, monthly)
            out = {
                "x-request-id": request_id,
                _TOKENS[0]: self.monthly_text,
                _TOKENS[1]: str(left),
                _TOKENS[2]: reset_text(int(reset + 0.999)),
            }
        else:
            out = {"x-request-id": request_id}
            key_limits.response_headers(self.billing.quota, admission, verdict, out)
        if leased is not None:
            out.update(leased)
        return out


_TOKENS, _REQUESTS = key_limits.TOKENS_TRIO, key_limits.REQUESTS_TRIO


# ``Exchange.notes``' entry for the -requests trio ``take`` made from a
# lease: the response's headers, and a later refusal's (``run.quota_headers``).
LEASED = "rate_headers"


def leased_headers(lim: Limit, used: int, reset_ms: int, capacity_text: str) -> dict[str, str]:
    """``key_limits.headers`` of the window ``PermitLeases.take`` would have
    reported for these numbers (``Window(lim, lim.capacity, True, used,
    reset_ms, 0)``), without building it; ``capacity_text``: ``str(lim.capacity)``, kept.
    ``KeyAdmission.take`` makes the hour's trio the same way, inline."""
    out: dict[str, str] = {}
    key_limits.put_window(out, lim.name, capacity_text, max(0, lim.capacity - used), reset_ms)
    return out


def opened(billing: Billing, ex: Exchange, admission: Admission) -> None:
    """The admission on the usage record, and in the journal (a crash from
    here on bills the request as interrupted)."""
    ex.record.admission = admission
    if ex.event_id:  # a batch line's row is keyed by its batch and line, never drawn
        admission.event_id, admission.billed_in = ex.event_id, ex.billed_in
    billing.journal_open(ex.record, ex.body)


def of(
    billing: Billing, config: Config, who: Principal, limiter: RateLimiter | PermitLeases
) -> KeyAdmission:
    """The key's admission object for this snapshot, built on first use."""
    kept = who.memo.get("admission")
    if (
        isinstance(kept, KeyAdmission)
        and kept.config is config
        and kept.billing is billing
        and kept.limiter is limiter
    ):
        return kept
    made = who.memo["admission"] = KeyAdmission(billing, config, who, limiter)
    return made
