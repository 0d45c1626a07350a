"""What the billing path keeps per key instead of rebuilding per request
(``Principal.memo``, ``Authenticator.cached``, ``KeyHasher``, ``QuotaBook.take`` /
``tokens_left``, the journal's lazily built ``o`` line): it must answer what
the per-request code answered, and a key's change must reach it as it
reaches the key itself (within ``key_cache_ttl_s``)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest

from proxy.config.tiers import BillingPolicy, Tier
from proxy.core.errors import InvalidApiKey
from proxy.core.principal import Principal
from proxy.core.record import UsageRecord
from proxy.stages.admit import key_limits
from proxy.stages.admit.billing import Admission, ratelimit_headers
from proxy.stages.auth import Authenticator, KeyCache
from proxy.stores import apikeys
from proxy.stores.journal import Journal, interrupted_rows
from proxy.stores.ledger import COLUMNS
from proxy.stores.quota import QuotaBook, Reservation
from proxy.stores.windows import HOUR_MS, Limit, Verdict, Window
from tests.billing_helpers import billing_config, tenant_with_key
from tests.conftest import Gateway, StartKeyed
from tests.fakes import FakeOpenAI
from tests.waiting import until

PRO = Tier("pro", 1000, None, 30_000, 20_000_000, 4096)
MSG = [{"role": "user", "content": "hi"}]


async def _limits_headers(gw: Gateway, key: str) -> dict[str, str]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.base_url + "/chat/completions",
            json={"model": "echo", "messages": MSG},
            headers={"Authorization": f"Bearer {key}"},
        ) as r,
    ):
        assert r.status == 200, await r.text()
        return {k.lower(): v for k, v in r.headers.items() if k.lower().startswith("x-ratelimit")}


async def test_a_tier_change_reaches_the_kept_limits_within_the_cache_ttl(
    start_keyed: StartKeyed, fake_openai: FakeOpenAI
) -> None:
    """The key's rate-limit windows and its headers follow a tier change
    once the key cache has let the old principal go (0.5 s in the test
    config), as the key's tier itself always did."""
    keyed = await start_keyed(billing_config(fake_openai.url), "pro")
    gw, tenant, key = keyed.gw, keyed.tenant, keyed.key
    for _ in range(3):  # the kept limits are in use
        pro = await _limits_headers(gw, key["api_key"])
    assert pro["x-ratelimit-limit-requests"] == "1000"
    assert pro["x-ratelimit-limit-tokens"] == "20000000"
    await keyed.pool.execute("UPDATE tenants SET tier = 'free' WHERE name = $1", tenant)

    async def on_free() -> bool:
        headers = await _limits_headers(gw, key["api_key"])
        return headers["x-ratelimit-limit-requests"] == "100"

    await until(on_free, 0.5 + 2.0, interval=0.05)
    free = await _limits_headers(gw, key["api_key"])
    assert free["x-ratelimit-limit-tokens"] == "1000000"  # free's monthly tokens
    # A window of its own: the free tier's hour counts from its first request.
    assert int(free["x-ratelimit-remaining-requests"]) < 100


def test_kept_limits_follow_a_reloaded_tier_object() -> None:
    """A config reload brings new ``Tier`` objects: the key's kept limits
    are rebuilt for the new one at the next request, not at the TTL."""
    who = Principal("key_m", "tw-m", 1, "t", "pro", None)
    first = key_limits.request_limits(who, PRO, 0)
    assert key_limits.request_limits(who, PRO, 0) is first  # kept, not rebuilt
    reloaded = dataclasses.replace(PRO, requests_per_hour=7)
    again = key_limits.request_limits(who, reloaded, 0)
    assert [lim.capacity for lim in again] == [7]
    assert list(again) == key_limits.limits_for(reloaded, who.key_id, 0)
    # A tier with a token window, or a request with an end user, is built
    # per request (its cost is the request's own).
    tpm = dataclasses.replace(PRO, tokens_per_minute=500)
    assert [lim.cost for lim in key_limits.request_limits(who, tpm, 42)] == [1, 42]
    per_user = dataclasses.replace(PRO, user_requests_per_hour=5)
    assert len(key_limits.request_limits(who, per_user, 0, "alice")) == 2


def test_a_principal_is_the_same_key_whatever_it_keeps() -> None:
    """The memo is not part of the key's identity (budgets' and leases'
    lookups compare and hash principals)."""
    a = Principal("key_m", "tw-m", 1, "t", "pro", None)
    b = Principal("key_m", "tw-m", 1, "t", "pro", None)
    key_limits.request_limits(a, PRO, 0)
    assert a == b and hash(a) == hash(b) and a.memo and not b.memo


async def test_the_headers_are_the_standing_headers(pg: asyncpg.Pool, tmp_path: Path) -> None:
    """``response_headers`` reports what the monthly standing and the hour
    window reported before: the -tokens trio from the month (a tier without
    a minute window), the -requests trio from the hour."""
    tenant, _ = await tenant_with_key(pg, tmp_path, "pro")
    tenant_id = await pg.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    who = Principal("key_h", "tw-h", tenant_id, tenant, "pro", None)
    book = QuotaBook(pg, "w-headers", BillingPolicy())
    hour = Limit("tw:rl:{key_h}:rph", "requests_per_hour", 1000, HOUR_MS)
    verdict = Verdict(True, (Window(hour, 1000, True, 3, 3_599_000, 0),), 0, True)
    unleased = Reservation(tenant_id, book._month()[0], 1, 500, leased=False)
    for reservation in (unleased, await book.admit(who, PRO, 500)):  # no lease, then a lease
        admission = Admission(who, PRO, reservation)
        got = key_limits.response_headers(book, admission, verdict)
        monthly = ratelimit_headers(book.standing(tenant_id, PRO))
        want = {k: v for k, v in monthly.items() if not k.endswith("-requests")}
        want |= key_limits.headers(verdict)
        assert got == want
        assert got["x-ratelimit-remaining-requests"] == "997"
    assert book.take(who, PRO, 500) is not None  # the lease has room: no await


def test_take_answers_only_from_a_lease_with_room() -> None:
    who = Principal("key_t", "tw-t", 9, "t", "pro", None)
    book = QuotaBook(None, "w-take", BillingPolicy())  # type: ignore[arg-type] - no query here
    assert book.take(who, PRO, 10) is None  # no lease: admit() must refill
    unlimited = Tier("open", None, None, None, None, 4096)
    free = book.take(who, unlimited, 10)
    assert free is not None and not free.leased


def test_cached_answers_like_authenticate(tmp_path: Path) -> None:
    hasher = apikeys.KeyHasher(b"s" * 32)
    cache = KeyCache(60.0)
    auth = Authenticator(None, hasher, cache)  # type: ignore[arg-type] - no query here
    known, revoked, expired, unseen = (apikeys.generate() for _ in range(4))
    who = Principal("key_c", "tw-c", 1, "t", "pro", None)
    cache.put(hasher.digest(known), who)
    cache.put(hasher.digest(revoked), None)
    past = datetime.now(UTC) - timedelta(seconds=1)
    cache.put(hasher.digest(expired), dataclasses.replace(who, expires_at=past))
    assert auth.cached(f"Bearer {known}") is who
    assert auth.cached(f"Bearer {unseen}") is None  # to be looked up
    for bad in (f"Bearer {revoked}", f"Bearer {expired}", "Bearer junk", None):
        with pytest.raises(InvalidApiKey):
            auth.cached(bad)


def test_the_key_digest_is_hmac_sha256() -> None:
    """Keys already stored were hashed with ``hmac.new``: the digest from the
    kept padded-key states must be the same, for any secret length (one
    longer than SHA-256's block is hashed first)."""
    import hashlib
    import hmac
    import secrets

    for size in (16, 32, 63, 64, 65, 200):
        secret, key = secrets.token_bytes(size), apikeys.generate()
        want = hmac.new(secret, key.encode(), hashlib.sha256).digest()
        hasher = apikeys.KeyHasher(secret)
        assert hasher.digest(key) == want
        assert hasher.digest(key) == want  # the kept states are copied, never consumed


async def test_the_journal_writes_the_open_line_it_always_wrote(tmp_path: Path) -> None:
    """The ``o`` line is built from the kept values only when written; a
    crash replay reads it back into the row's fixed columns."""
    journal = Journal(tmp_path / "journal-w.jsonl")
    period = datetime(2026, 12, 1, tzinfo=UTC).date()
    record = UsageRecord("req-1", "chat", public_model="fake-model")
    values = ("ev-1", period, "req-1", 7, "key_j", "w", "chat", "fake-model", True, True, 12, 1.5)
    journal.open(values, record, {"stream": True})
    await journal.flush()
    [line] = (tmp_path / "journal-w.jsonl").read_bytes().splitlines()
    opened = orjson.loads(line)["o"]
    assert opened == {
        "e": "ev-1",
        "p": "2026-12-01",
        "r": "req-1",
        "t": 7,
        "k": "key_j",
        "w": "w",
        "n": "chat",
        "m": "fake-model",
        "s": True,
        "l": True,
        "pt": 12,
        "at": 1.5,
    }
    [row] = interrupted_rows(line, {})
    got = dict(zip(COLUMNS, row.values, strict=True))
    assert (got["period"], got["event_id"], got["tenant_id"], got["prompt_tokens"]) == (
        period,
        "ev-1",
        7,
        12,
    )
    assert row.leased and got["error_code"] == "interrupted"
    await journal.close()


def test_reservation_of_take_is_admits_shape() -> None:
    """``take`` reserves what ``admit`` reserves from a lease (one request,
    the estimate's tokens when the tier counts tokens)."""
    who = Principal("key_r", "tw-r", 3, "t", "pro", None)
    book = QuotaBook(None, "w-r", BillingPolicy())  # type: ignore[arg-type] - no query here
    period = book._month()[0]
    lease = book._lease(3, period)
    lease.requests, lease.tokens = 2, 1_000
    got = book.take(who, PRO, 600)
    assert got == Reservation(3, period, 1, 600, leased=True)
    assert (lease.requests, lease.tokens) == (1, 400)
    assert book.take(who, PRO, 600) is None  # 400 tokens left: admit() refills
    no_tokens = dataclasses.replace(PRO, monthly_tokens=None)
    assert book.take(who, no_tokens, 600) == Reservation(3, period, 1, 0, leased=True)
    assert (lease.requests, lease.tokens) == (0, 400)
