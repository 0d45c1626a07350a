"""The billing path's admission in one call per request
(``proxy.stages.admit.keyed``) and the key remembered by its
``Authorization`` value (``Authenticator.seen``): each must answer what the
per-request code answers, and a key's revocation or expiry must reach it
exactly as it reaches the key cache."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config.tiers import BillingPolicy
from proxy.core.errors import InvalidApiKey
from proxy.core.principal import Principal
from proxy.core.record import UsageRecord
from proxy.pipeline.registry import parse_config
from proxy.stages import auth as auth_stage
from proxy.stages.admit import budget, key_limits, keyed
from proxy.stages.admit.billing import Admission, Billing
from proxy.stages.auth import Authenticator, KeyCache
from proxy.stages.base import Exchange
from proxy.stages.route import RoutePlan
from proxy.stores import apikeys
from proxy.stores.permits import PermitLeases
from proxy.stores.permits import _Lease as _PermitLease
from proxy.stores.quota import QuotaBook
from proxy.stores.quota import _Lease as _QuotaLease
from proxy.stores.windows import HOUR_MS, Limit
from proxy.web.keys import RUNTIME
from tests.billing_helpers import TEST_TIERS, billing_config
from tests.conftest import StartKeyed
from tests.fakes import FakeOpenAI
from tests.waiting import until_sync

MSG = [{"role": "user", "content": "hello there, how are you today?"}]


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _CountingHasher(apikeys.KeyHasher):
    def __init__(self) -> None:
        super().__init__(b"s" * 32)
        self.calls = 0

    def digest(self, key: str) -> bytes:
        self.calls += 1
        return super().digest(key)


def _auth(ttl: float = 5.0) -> tuple[Authenticator, _CountingHasher, KeyCache, _Clock]:
    clock, hasher = _Clock(), _CountingHasher()
    cache = KeyCache(ttl, clock=clock)
    return Authenticator(None, hasher, cache), hasher, cache, clock  # type: ignore[arg-type]


def test_a_repeat_key_skips_the_hmac_while_the_cache_holds_it() -> None:
    auth, hasher, cache, _ = _auth()
    key = apikeys.generate()
    who = Principal("key_r", "tw-r", 1, "t", "pro", None)
    cache.put(hasher.digest(key), who)
    hasher.calls = 0
    for _ in range(3):
        assert auth.cached(f"Bearer {key}") is who
    assert hasher.calls == 1  # the first request hashed it; the repeats did not


def test_a_remembered_key_is_refused_once_revoked_and_looked_up_after_the_ttl() -> None:
    """A refresh that finds the key revoked (the cache's entry becomes
    None), and the TTL running out, reach the remembered value at once."""
    auth, hasher, cache, clock = _auth(ttl=5.0)
    key = apikeys.generate()
    header = f"Bearer {key}"
    who = Principal("key_v", "tw-v", 1, "t", "pro", None)
    cache.put(hasher.digest(key), who)
    assert auth.cached(header) is who  # remembered
    cache.put(hasher.digest(key), None)  # looked up again: revoked
    with pytest.raises(InvalidApiKey):
        auth.cached(header)
    cache.put(hasher.digest(key), who)
    assert auth.cached(header) is who  # remembered again
    clock.now += 5.01  # past the TTL: the key must be looked up, as without it
    assert auth.cached(header) is None


def test_unknown_keys_are_never_remembered_and_the_map_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(auth_stage, "SEEN_MAX", 4)
    auth, hasher, cache, _ = _auth()
    unknown = apikeys.generate()
    cache.put(hasher.digest(unknown), None)
    with pytest.raises(InvalidApiKey):
        auth.cached(f"Bearer {unknown}")
    assert auth.seen._map == {}
    for i in range(10):
        key = apikeys.generate()
        cache.put(hasher.digest(key), Principal(f"key_{i}", "tw-b", 1, "t", "pro", None))
        auth.cached(f"Bearer {key}")
        assert len(auth.seen._map) <= 4


def test_a_remembered_key_expires_when_the_key_does() -> None:
    """The key's own ``expires_at`` is checked on every request, as on the
    digest path: a key that expires while its cache entry is fresh is refused."""
    auth, hasher, cache, _ = _auth(ttl=3600.0)
    key = apikeys.generate()
    soon = datetime.now(UTC) + timedelta(milliseconds=300)
    cache.put(hasher.digest(key), Principal("key_e", "tw-e", 1, "t", "pro", soon))
    assert auth.cached(f"Bearer {key}") is not None

    def refused() -> bool:
        try:
            auth.cached(f"Bearer {key}")
        except InvalidApiKey:
            return True
        return False

    until_sync(refused, 5.0, what="the expired key refused")


async def _chat(url: str, key: str) -> dict[str, str]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            url + "/chat/completions",
            json={"model": "echo", "messages": MSG},
            headers={"Authorization": f"Bearer {key}"},
        ) as r,
    ):
        assert r.status == 200, await r.text()
        return {k.lower(): v for k, v in r.headers.items() if k.lower().startswith("x-ratelimit")}


async def test_one_call_admits_what_the_per_request_code_admits(
    start_keyed: StartKeyed, fake_openai: FakeOpenAI, redis_url: str
) -> None:
    """On a served gateway's own leases: the fast path's estimate, quota
    reservation, budget hold and headers (names, order, values) are those of
    ``billing._estimate``, ``budget.max_cost`` / ``limits_for`` and
    ``key_limits.response_headers`` for the same request."""
    tiers: dict[str, Any] = {
        **TEST_TIERS,
        "budgeted": {
            **TEST_TIERS["pro"],
            "monthly_budget_usd": 1000,
            "key_daily_budget_usd": 100,
        },
    }
    config = billing_config(fake_openai.url)
    config["tiers"] = tiers
    keyed_gw = await start_keyed(config, "budgeted", set(tiers), redis_url=redis_url)
    gw, api_key = keyed_gw.gw, keyed_gw.api_key
    for _ in range(3):  # the leases are taken, the key cached
        served = await _chat(gw.base_url, api_key)
    assert list(served) == [
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ]
    rt = gw.app[RUNTIME]
    billing, snapshot = rt.billing, rt.config.current
    assert billing is not None and billing.budgets is not None
    who = billing.auth.cached(f"Bearer {api_key}")
    assert who is not None
    key = keyed.of(billing, snapshot.config, who, rt.permits or rt.limiter)
    assert keyed.of(billing, snapshot.config, who, rt.permits or rt.limiter) is key  # kept
    plan = snapshot.router.plan("echo", {}, tenant=who.tenant, tier=who.tier, access=key.tier)
    for i, asked in enumerate(({}, {"max_tokens": 50}, {"max_tokens": 10**6, "n": 2})):
        body = {"model": "echo", "messages": MSG, **asked}
        record = UsageRecord(f"req-{i}", "chat", config=snapshot.config)
        ex = Exchange(None, record, snapshot.config, "chat", body, 0.0, who=who, model="echo")
        taken = key.take(ex, plan)
        assert taken is not None  # the leases have room
        admission, ask, done, verdict = taken
        assert record.admission is admission  # noted at once: settling gives it back
        assert ask is None and admission.budget is not None
        again = {"model": "echo", "messages": MSG, **asked}
        tier, estimate, prompt = billing._estimate(snapshot.config, who, again, "chat")
        assert body == again  # the same limits capped the same way
        assert (admission.tier, admission.tokens, admission.prompt_tokens) == (
            tier,
            estimate,
            prompt,
        )
        assert prompt is not None
        completion = budget.completion_budget(again, "chat")
        cost = budget.max_cost(plan, snapshot.config.prices, prompt, completion)
        assert admission.budget.micros == cost
        assert admission.budget.limits == budget.limits_for(who, tier, billing.quota.clock())
        assert isinstance(admission, Admission)
        leased = ex.notes.get(keyed.LEASED)
        if not done:  # the permit lease was short: the window is counted in Redis
            verdict = await key_limits.admit(rt.permits, snapshot.config, admission, None)
        assert (verdict is None) == isinstance(leased, dict)  # one or the other says the hour
        got = key.headers("req-x", admission, verdict, leased)
        want = {"x-request-id": "req-x"}
        want |= key_limits.response_headers(billing.quota, admission, verdict)
        want |= leased or {}  # a lease's trio: the verdict's (test_leased_headers_are_...)
        assert list(got.items()) == list(want.items())
        assert list(got)[1:] == list(served)  # the names, in the served order
        record.status = 499  # not served: settling refunds the reservation and the hold
        billing.settle(record)


def test_leased_headers_are_the_verdicts_headers() -> None:
    """The -requests trio made from ``PermitLeases.take_one``'s numbers is
    ``key_limits.headers`` of the verdict ``take`` builds on the same lease."""
    clock = _Clock()
    hour = Limit("tw:rl:{key_l}:rph", "requests_per_hour", 1000, HOUR_MS)
    twins = [PermitLeases(None, clock=clock) for _ in range(2)]  # type: ignore[arg-type]
    for leases in twins:
        leases._leases[hour.key] = _PermitLease(7, clock.now + 6.0, 40, 300, 2_345_678, 0, 999.5, 8)
    for _ in range(5):
        verdict = twins[0].take([hour])
        got = twins[1].take_one(hour)
        assert verdict is not None and got is not None
        assert keyed.leased_headers(hour, got[0], got[1], "1000") == key_limits.headers(verdict)
        clock.now += 0.7
    assert twins[1].take_one(Limit(hour.key, hour.name, 1000, HOUR_MS, 10**6)) is None  # short


def test_the_lease_trio_take_makes_is_the_verdicts_trio() -> None:
    """``KeyAdmission.take`` formats the -requests trio of a window admitted
    from a lease (with ``leased_headers``, no verdict built): it must be
    ``key_limits.headers`` of the verdict ``PermitLeases.take`` builds on a
    twin lease, second after second, and the whole block its ``headers``
    returns that of ``key_limits.response_headers`` with that trio."""
    config = parse_config(yaml.safe_dump(billing_config("http://127.0.0.1:9")), {})
    who = Principal("key_lt", "tw-lt", 5, "t", "tiny", None)
    quota = QuotaBook(None, "w-lt", BillingPolicy())  # type: ignore[arg-type] - no query here
    quota._leases[(5, quota._month()[0])] = _QuotaLease(10**6, 10**9, 10**6, 10**9)
    billing = Billing(None, quota, None, config.prices)  # type: ignore[arg-type]
    clock = _Clock()
    twins = [PermitLeases(None, clock=clock) for _ in range(2)]  # type: ignore[arg-type]
    key = keyed.of(billing, config, who, twins[1])
    assert key.rate is not None and len(key.rate) == 1
    hour = key.rate[0]
    for leases in twins:
        leases._leases[hour.key] = _PermitLease(7, clock.now + 9.0, 40, 300, 2_345_678, 0, 999.5, 8)
    plan = RoutePlan("echo", ())
    for i in range(5):
        record = UsageRecord(f"r{i}", "chat", config=config)
        body = {"model": "echo", "messages": MSG}
        ex = Exchange(None, record, config, "chat", body, 0.0, who=who, model="echo")
        taken = key.take(ex, plan)
        verdict = twins[0].take([hour])
        assert taken is not None and taken[1:] == (None, True, None) and verdict is not None
        leased = ex.notes[keyed.LEASED]
        assert leased == key_limits.headers(verdict)
        got = key.headers("req", taken[0], None, leased)  # type: ignore[arg-type]
        want = {"x-request-id": "req", **key_limits.response_headers(quota, taken[0], verdict)}
        assert list(got.items()) == list(want.items())
        clock.now += 0.7
