"""Billing glue: authenticate + admit before forwarding, settle after.

``Billing`` owns the Postgres pool and the three parts that use it: the
``Authenticator`` (keys), the ``QuotaBook`` (monthly quota leases) and the
``Ledger`` (batched usage events). As a ``Settler`` it turns every
``UsageRecord`` into one usage row, refunding the unused part of the
request's reservation on the way.
"""

from __future__ import annotations

import functools
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

import orjson

from proxy.config.budgets import to_micros
from proxy.config.model import Config
from proxy.config.tiers import Price, Tier
from proxy.core import ids, tokens
from proxy.core.errors import ModelNotAllowed, QuotaExceeded
from proxy.core.pricing import cost_of
from proxy.core.principal import Principal
from proxy.core.record import UsageRecord
from proxy.providers.base import GENERATIVE
from proxy.stages.auth import Authenticator
from proxy.stores.budgets import BudgetBook, Hold
from proxy.stores.journal import Journal, Opened
from proxy.stores.ledger import Ledger, UsageRow
from proxy.stores.quota import QuotaBook, Reservation, Standing, period_of


def new_worker_id() -> str:
    return f"{socket.gethostname()[:32]}-{secrets.token_hex(4)}"


@dataclass(slots=True)
class Admission:
    principal: Principal
    tier: Tier
    reservation: Reservation
    tokens: int = 0  # prompt estimate + max_tokens, when a token limit needs it
    # The usage row's idempotency key, drawn here so the journal can name the
    # request from admission on (the row is written under the same id).
    event_id: str = ""
    prompt_tokens: int | None = None  # the prompt estimate, when admission needed one
    budget: Hold | None = None  # the maximum cost reserved from USD budgets (admit.budget)
    # The month an earlier run of the same batch line was billed in: the row
    # goes there, where its key makes it a no-op, not into this month's.
    billed_in: date | None = None

    @property
    def period(self) -> date:
        """The usage row's month: the reservation's, unless billed before."""
        return self.billed_in or self.reservation.period


def tier_of(config: Config, principal: Principal) -> Tier:
    tier = config.tiers.get(principal.tier)
    if tier is None:
        raise ModelNotAllowed(
            f"Your key's tier '{principal.tier}' is not configured on this gateway."
        )
    return tier


def needs_estimate(tier: Tier) -> bool:
    """Whether admitting to ``tier`` reserves tokens, so needs the prompt estimate."""
    return (
        tier.monthly_tokens is not None
        or tier.tokens_per_minute is not None
        or tier.user_tokens_per_minute is not None
    )


_LIMITS = ("max_completion_tokens", "max_tokens")


def clamp_max_tokens(body: dict[str, Any], tier: Tier, endpoint: str) -> int:
    """Cap every completion limit the request sets at the tier's
    ``max_tokens``, and return the budget to reserve: the largest of them,
    since a provider may honour either one. A request that sets neither gets
    the cap (as ``max_tokens``, or as the limit it sent as null), so the
    reservation always bounds what the provider may generate. The name is
    not final: each attempt's adapter sends the limit under the parameter
    its target's model accepts (``Call.token_limit``, from the model family),
    since one plan may mix families (``gpt-4o`` falling back to ``o3-mini``)."""
    if endpoint not in GENERATIVE:
        return 0
    cap = tier.max_tokens
    n = body.get("n")  # most requests send none: no ``isinstance`` then (~1k instructions)
    times = 1 if n is None else n if isinstance(n, int) and n > 0 else 1
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        # most requests: no limit sent (or null), the cap goes out
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        body[key] = cap
        return cap * times
    budget = None  # the largest limit sent, once capped
    for key in _LIMITS:
        asked = body.get(key)
        if isinstance(asked, int):
            body[key] = capped = min(asked, cap)
            budget = capped if budget is None else max(budget, capped)
    if budget is None:
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        body[key] = budget = cap
    return int(budget) * times


def ratelimit_headers(standing: Standing) -> dict[str, str]:
    reset = reset_duration(standing.reset_seconds)
    out = {}
    if standing.limit_requests is not None:
        out["x-ratelimit-limit-requests"] = str(standing.limit_requests)
        out["x-ratelimit-remaining-requests"] = str(standing.remaining_requests)
        out["x-ratelimit-reset-requests"] = reset
    if standing.limit_tokens is not None:
        out["x-ratelimit-limit-tokens"] = str(standing.limit_tokens)
        out["x-ratelimit-remaining-tokens"] = str(standing.remaining_tokens)
        out["x-ratelimit-reset-tokens"] = reset
    return out


def reset_duration(seconds: float) -> str:
    """OpenAI's reset format: ``6m0s``, ``1h2m3s``, ``1s``. Every response
    reports two resets: ``float.__trunc__`` is ``int()`` of the float, without
    the type call's argument parsing (~0.9k of ~2.2k instructions a call)."""
    return _reset_text((seconds + 0.999).__trunc__())


@functools.lru_cache(maxsize=4096)
def _reset_text(s: int) -> str:
    """Formatted once per second of distance: every response reports two
    resets, which move by a second at a time."""
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{sec}s"
    return f"{m}m{sec}s" if m else f"{sec}s"


class Billing:
    def __init__(
        self,
        auth: Authenticator,
        quota: QuotaBook,
        ledger: Ledger,
        prices: Mapping[str, Price],
        journal: Journal | None = None,
        budgets: BudgetBook | None = None,
    ) -> None:
        self.auth = auth
        self.budgets = budgets
        self.quota = quota
        self.ledger = ledger
        self.prices = prices
        self.journal = journal
        if journal is not None:
            ledger.on_durable = journal.closed
            journal.opened_of = self._opened

    def _estimate(
        self, config: Config, principal: Principal, body: dict[str, Any], endpoint: str
    ) -> tuple[Tier, int, int | None]:
        """The tier, the tokens to reserve and the prompt estimate (None when
        no token limit needs one); caps the body's completion limits."""
        tier = tier_of(config, principal)
        budget = clamp_max_tokens(body, tier, endpoint)
        if needs_estimate(tier):
            prompt = tokens.estimate_prompt(body, endpoint)
            return tier, prompt + budget, prompt
        return tier, 0, None

    async def admit(
        self,
        config: Config,
        principal: Principal,
        body: dict[str, Any],
        endpoint: str,
        public_model: str,
    ) -> Admission:
        tier, estimate, prompt = self._estimate(config, principal, body, endpoint)
        reservation = self.quota.take(principal, tier, estimate)
        try:
            if reservation is None:  # the local lease is short: refill (or refuse)
                reservation = await self.quota.admit(principal, tier, estimate)
        except QuotaExceeded as exc:
            exc.headers.update(ratelimit_headers(self.quota.standing(principal.tenant_id, tier)))
            raise
        return Admission(principal, tier, reservation, estimate, ids.event_id(), prompt)

    def journal_open(self, record: UsageRecord, body: dict[str, Any]) -> None:
        """Note the admitted request in the journal: from here on a crash
        bills it as interrupted instead of losing it. Only the record is
        kept (the body on it, until settle drops it): the ``o`` line's
        values are read off it (``_opened``) if the request is still open
        when the journal is written."""
        admission = record.admission
        if self.journal is not None and isinstance(admission, Admission):
            self.journal.admitted(admission.event_id, record, body)

    def _opened(self, record: UsageRecord, body: dict[str, Any], at: float) -> Opened:
        """journal.OPENED_KEYS' values for a journalled (so admitted) request."""
        admission = record.admission
        assert isinstance(admission, Admission)
        return (
            admission.event_id,
            admission.period,
            record.request_id,
            record.tenant_id,
            record.key_id,
            self.quota.worker_id,
            record.api,
            record.public_model,
            body.get("stream") is True,
            admission.reservation.leased,
            admission.prompt_tokens,
            at,
        )

    def settle(self, record: UsageRecord) -> None:
        """The quota and budget refunds, then the usage row (runs for every
        request). Priced once, at the prices of the snapshot the request ran
        on (a reload mid-stream does not reprice it); the budgets and the row
        take the same cost. A cache hit's usage is what its policy bills."""
        admission = record.admission
        if not isinstance(admission, Admission):
            if record.tenant_id is None:
                return  # unauthenticated: nothing to bill, nothing reserved
            admission = None  # authenticated, refused before admission
        record.body = record.progress = None  # the journal keeps the record: not these
        cost = cost_of(record, self.prices)
        counted = admission is not None and self._refund(record, admission, cost)
        self.ledger.add(self._row(record, admission, counted, cost))

    def _refund(self, record: UsageRecord, admission: Admission, cost: Decimal | None) -> bool:
        """Give back what the request reserved and did not use; whether it
        counts (it used tokens, or it succeeded)."""
        usage = record.usage
        total = usage.prompt_tokens + usage.completion_tokens
        counted = total > 0 or record.status < 400
        self.quota.release(admission.reservation, counted, total)
        hold = admission.budget
        if hold is not None and self.budgets is not None:
            self.budgets.release(hold, to_micros(cost) if counted and cost else 0)
        return counted

    def _row(
        self,
        record: UsageRecord,
        admission: Admission | None,
        counted: bool,
        cost: Decimal | None,
    ) -> UsageRow:
        """The row's values, straight into the one tuple the ledger's batch
        writes as an array (``batch_json``)."""
        if admission is not None:
            period, event_id = admission.period, admission.event_id
            leased, hold = admission.reservation.leased, admission.budget
        else:  # its own id
            period, event_id = period_of(self.quota.clock()), ids.event_id()
            leased, hold = False, None
        usage, tags = record.usage, record.tags
        values = (
            period,
            event_id,  # the row's idempotency key, fixed from admission (journal) on
            record.request_id,
            record.tenant_id,
            record.key_id,
            self.quota.worker_id,
            record.api,
            record.public_model,
            record.provider,
            record.provider_model,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.source,
            counted,
            record.cached,
            record.stream,
            record.client_disconnected,
            record.status,
            record.error_code,
            record.latency_ms,
            record.ttft_ms,
            record.attempts,
            cost,
            _details(record),
            record.end_user,
            orjson.dumps(tags).decode() if tags else None,
            record.client_ip,
        )
        if hold is None:
            return UsageRow(values, leased)
        return UsageRow(values, leased, hold.day, bool(hold.limits))


def _details(record: UsageRecord) -> str | None:
    """Provider-specific token counts, plus every attempt that reached a
    provider: a failed attempt may still be on the provider's invoice, plus
    the guardrails' verdicts, a semantic cache hit's similarity."""
    given, extra, attempts = record.usage.details, record.extra, record.attempt_log
    if not given and not extra and len(attempts) == 1 and record.status < 400:
        return None  # one attempt that served, nothing else to say: most requests
    # The keys come from the provider's usage object: made safe for jsonb.
    details: dict[str, object] = {_key(k): v for k, v in given.items()}
    reached = [a for a in record.attempt_log if a.reached]
    if len(reached) > 1 or (reached and record.status >= 400):
        details["attempts"] = [
            {"provider": a.provider, "model": a.model, "status": a.status} for a in reached
        ]
    guardrails = extra.get("guardrails")  # verdicts and counts, never the matched text
    if guardrails:
        details["guardrails"] = guardrails
    semantic = extra.get("semantic_cache")  # a semantic hit: how similar its match was
    if isinstance(semantic, dict) and semantic.get("result") == "hit":
        details["cache"], details["similarity"] = "semantic", semantic.get("similarity")
    return orjson.dumps(details).decode() if details else None


def _key(name: str) -> str:
    """A provider-chosen name as jsonb takes it: no NUL (Postgres refuses
    ``\\u0000`` in jsonb), no other control characters, at most 64 characters."""
    if len(name) <= 64 and name.isprintable():
        return name  # every name a provider sends: nothing to replace
    return "".join(c if c.isprintable() else "?" for c in name[:64])
