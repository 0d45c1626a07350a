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

It keeps the worker's quota lease of the month and budget leases of the
day it takes from: the stores' own objects (refills, top-ups, heartbeats
and sweeps act on them), taken from with the stores' ``take_from``, and
looked up again only for a new month, another day's limits, or a lease the
store dropped from its map (``take_from`` refuses it).
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
    tier_of,
)
from proxy.stages.base import Exchange
from proxy.stages.route import RoutePlan
from proxy.stores.budgets import Leases
from proxy.stores.permits import PermitLeases
from proxy.stores.quota import Held, Reservation, utc_now
from proxy.stores.ratelimit import RateLimiter
from proxy.stores.windows import Limit, Verdict

# A fast ``take`` that stopped short: (the admission, the budget ask to
# await or None, whether the key's windows were decided, their verdict).
Taken = tuple[Admission, budget.Ask | None, bool, Verdict | None]


class KeyAdmission:
    """What admission keeps per (principal, config snapshot, billing)."""

    __slots__ = (
        "billing",
        "budgeted",
        "config",
        "estimates",
        "held",
        "hour",
        "limiter",
        "monthly",
        "monthly_text",
        "per_user",
        "rate",
        "rate_text",
        "rates",
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
        # the -tokens trio's monthly limit, and as text (used only when set)
        self.monthly = tier.monthly_tokens
        self.monthly_text = str(self.monthly)
        # The worker's leases this key takes from, kept while current: the
        # tenant's quota lease of the month (``QuotaBook.current``: the
        # month's bounds, its period, the lease) and its budgets' leases for
        # the day's limits (``BudgetBook.leases_of``). The stores still own
        # them (refills, top-ups, sweeps act on the same objects); one they
        # drop refuses ``take_from``, and is looked up again.
        self.held: Held | None = None
        # The budgets' day is the memo entry of ``budget.limits_at`` (the
        # day's limits and bounds): while it ``holds`` for ``t``, they are
        # the limits ``limits_at`` would answer, without asking it.
        self.budgeted: tuple[budget.DayLimits, Leases] | None = None
        self.rates: tuple[RoutePlan, tuple[tuple[int, int], ...]] | None = None

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
        # One reading of the system clock for the quota's month and the
        # budgets' day; another clock is read as ``run.admit`` reads it.
        t = time.time() if self.billing.quota.clock is utc_now else None
        reservation = self._reserve(estimate, t)
        if reservation is None:
            return None
        admission = Admission(who, tier, reservation, estimate, ids.event_id(), prompt)
        opened(self.billing, ex, admission)
        if self.billing.budgets is not None:
            ask = self._budget(ex, plan, admission, completion, t)
            if ask is not None:
                return admission, ask, False, None
        done, verdict = self._windows(ex, admission)
        return admission, None, done, verdict

    def _reserve(self, estimate: int, t: float | None) -> Reservation | None:
        """``QuotaBook.take``, from the kept lease while its month is current."""
        quota, who, tier = self.billing.quota, self.who, self.tier
        held = self.held
        if held is not None and t is not None and held.month.start_ts <= t < held.month.end_ts:
            reservation = quota.take_from(held.lease, who, tier, held.month.period, estimate)
            if reservation is not None:
                return reservation
        reservation = quota.take(who, tier, estimate, t)  # short, dropped, or a new month
        if reservation is not None and reservation.leased and t is not None:
            self.held = quota.current(who.tenant_id, t)
        return reservation

    def _budget(
        self, ex: Exchange, plan: RoutePlan, admission: Admission, completion: int, t: float | None
    ) -> budget.Ask | None:
        """The budgets' hold from their leases (``admission.budget``); the
        ask to await when a lease is short."""
        book, who, tier = self.billing.budgets, self.who, self.tier
        assert book is not None
        kept = self.budgeted
        if kept is not None and t is not None and kept[0].holds(tier.budgets, t):
            today = kept[0]  # the kept day's, still current
        elif t is not None:
            today = budget.limits_at(who, tier, t)
        else:
            today = budget.day_limits(who, tier, self.billing.quota.clock())
        limits, day = today.limits, today.day
        if not limits:
            return None
        prompt = admission.prompt_tokens
        if prompt is None:  # as ``budget.take``: the size-based estimate
            prompt = tokens.estimate_prompt(ex.body, ex.endpoint)
        # ``budget.max_cost``: ``completion`` is ``completion_budget``'s value
        # (the limit the body goes out with, clamped above, x n)
        micros = budget.bound(self._rates(plan), prompt, completion)
        hold = None
        if kept is not None and kept[0].limits is limits:
            hold = book.take_from(kept[1], limits, micros, day)
        if hold is None:  # short, dropped, another day's limits, or none kept yet
            hold = book.take(limits, micros, day)
            if hold is None:
                return budget.Ask(limits, micros, day)
            self.budgeted = (today, hold.leases)
        admission.budget = hold
        return None

    def _rates(self, plan: RoutePlan) -> tuple[tuple[int, int], ...]:
        """``budget.plan_rates`` of the plan, kept for the last plan asked
        (the router keeps a tier's plan per model, so a key's requests bring
        the same object; the prices are this snapshot's, as the object is)."""
        kept = self.rates
        if kept is not None and kept[0] is plan:
            return kept[1]
        rates = budget.plan_rates(plan, self.config.prices)
        self.rates = (plan, rates)
        return rates

    def _windows(self, ex: Exchange, admission: Admission) -> tuple[bool, Verdict | None]:
        """The key's windows from the permit leases: whether they were
        decided, and their verdict (None when the hour's lease admitted it:
        its header trio is then in ``ex.notes``)."""
        hour, user = self.hour, ex.record.end_user
        if hour is not None and (user is None or not self.per_user):
            # The key's hourly window from the lease: its -requests header
            # trio made from the lease's numbers, no verdict built.
            leases, lim = hour
            got = leases.take_one(lim)
            if got is None:
                return False, None
            ex.notes[LEASED] = leased_headers(lim, got[0], got[1], self.rate_text)
            return True, None
        rate = self.rate
        if rate is None or (user is not None and self.per_user):
            return key_limits.take(self.limiter, admission, user)
        if not rate:
            return True, None
        limiter = self.limiter
        verdict = limiter.take(rate) if isinstance(limiter, PermitLeases) else None
        return verdict is not None, verdict

    def headers(
        self,
        request_id: str,
        admission: Admission,
        verdict: Verdict | None,
        leased: dict[str, str] | None = None,
    ) -> dict[str, str]:
        """``x-request-id`` and ``key_limits.response_headers``; ``leased``:
        the window's trio ``take`` made from a lease (no verdict). Without a
        verdict that is the month's -tokens trio alone, its limit kept as text."""
        out = {"x-request-id": request_id}
        quota = self.billing.quota
        if verdict is None and self.monthly is not None and admission.tier is self.tier:
            tenant_id = admission.principal.tenant_id
            key_limits.put_monthly(out, quota, tenant_id, self.monthly, self.monthly_text)
        else:
            key_limits.response_headers(quota, admission, verdict, out)
        if leased is not None:
            out.update(leased)
        return out


# ``Exchange.notes``' entry for the -requests trio ``take`` made from a
# lease: the response's headers, and a later refusal's (``run.quota_headers``).
LEASED = "rate_headers"


def leased_headers(lim: Limit, used: int, reset_ms: int, capacity_text: str) -> dict[str, str]:
    """``key_limits.headers`` of the window ``PermitLeases.take`` would have
    reported for these numbers (``Window(lim, lim.capacity, True, used,
    reset_ms, 0)``), without building it; ``capacity_text``: ``str(lim.capacity)``, kept."""
    out: dict[str, str] = {}
    remaining = lim.capacity - used  # ``max(0, ...)`` spelled out: per request
    key_limits.put_window(out, lim.name, capacity_text, remaining if remaining > 0 else 0, reset_ms)
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
