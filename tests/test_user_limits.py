"""Per-end-user limits (OpenAI's ``user`` field) in the tier, on real Redis."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config.model import ConfigError
from proxy.pipeline.registry import parse_config
from proxy.web.admin import rate_limit
from tests.billing_helpers import TEST_TIERS, billing_config
from tests.conftest import Gateway, Keyed, StartKeyed
from tests.fakes import FakeOpenAI

MSG = [{"role": "user", "content": "hi"}]
TIERS: dict[str, Any] = {
    **TEST_TIERS,
    "per-user": {
        "requests_per_hour": 100,
        "monthly_requests": 1000,
        "max_tokens": 100,
        "user_requests_per_hour": 3,
    },
    # each request reserves prompt (~8) + max_tokens (100) tokens of the minute
    "user-tpm": {"requests_per_hour": 100, "max_tokens": 100, "user_tokens_per_minute": 300},
}


async def _chat(
    s: aiohttp.ClientSession, gw: Gateway, key: str, **extra: Any
) -> tuple[int, dict[str, str], Any]:
    async with s.post(
        gw.url + "/v1/chat/completions",
        json={"model": "fake-model", "messages": MSG, **extra},
        headers={"Authorization": f"Bearer {key}"},
    ) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.json()


async def _keyed(start_keyed: StartKeyed, fake: FakeOpenAI, redis_url: str, tier: str) -> Keyed:
    cfg = {**billing_config(fake.url), "tiers": TIERS}
    return await start_keyed(cfg, tier, set(TIERS), redis_url=redis_url)


async def test_each_end_user_gets_the_tiers_requests_per_hour_exactly(
    start_keyed: StartKeyed, fake_openai: FakeOpenAI, redis_url: str
) -> None:
    keyed = await _keyed(start_keyed, fake_openai, redis_url, "per-user")
    gw, api_key = keyed.gw, keyed.api_key
    async with aiohttp.ClientSession() as s:
        # 40 concurrent requests of one end user: exactly the tier's 3 pass.
        began = time.monotonic()
        results = await asyncio.gather(*(_chat(s, gw, api_key, user="alice") for _ in range(40)))
        took = time.monotonic() - began
        assert sorted(r[0] for r in results) == [200] * 3 + [429] * 37
        _, headers, body = next(r for r in results if r[0] == 429)
        prefix = api_key[:10]
        assert body["error"]["message"].startswith(
            f"Rate limit reached for end user 'alice' of key {prefix}... on requests per hour"
            " (RPH) per end user: Limit 3, Used 3, Requested 1. Please try again in 1h0m"
        )
        assert body["error"]["code"] == "rate_limit_exceeded"
        # The first request leaves the hour at the end of its 6 s slot, an
        # hour on; the refusal may come up to ``took`` after it was counted.
        assert 3600 - took - 1 <= int(headers["retry-after"]) <= 3606
        # The x-ratelimit-* headers keep describing the key's own window.
        assert headers["x-ratelimit-limit-requests"] == "100"
        # Another end user, and a request naming none, are not held back by alice.
        status, headers, _ = await _chat(s, gw, api_key, user="bob")
        assert status == 200
        assert headers["x-ratelimit-remaining-requests"] == str(100 - 4)
        assert (await _chat(s, gw, api_key))[0] == 200
        # alice's refusals took nothing from the key's hour: 3 + bob + anonymous.
        status, headers, _ = await _chat(s, gw, api_key, user="bob")
        assert status == 200 and headers["x-ratelimit-remaining-requests"] == str(100 - 6)
    # Only the admitted requests reached the provider.
    users = [seen.body.get("user") for seen in fake_openai.seen]
    assert Counter(users) == {"alice": 3, "bob": 2, None: 1}


async def test_end_user_tokens_per_minute_refuse_as_tokens(
    start_keyed: StartKeyed, fake_openai: FakeOpenAI, redis_url: str
) -> None:
    keyed = await _keyed(start_keyed, fake_openai, redis_url, "user-tpm")
    gw, key = keyed.gw, keyed.key
    async with aiohttp.ClientSession() as s:
        results = [await _chat(s, gw, key["api_key"], user="u-1") for _ in range(3)]
        assert [r[0] for r in results] == [200, 200, 429]
        _, headers, body = results[2]
        assert body["error"]["type"] == "tokens"
        assert "end user 'u-1'" in body["error"]["message"]
        assert "tokens per min (TPM) per end user: Limit 300" in body["error"]["message"]
        assert 0 < int(headers["retry-after"]) <= 61
        assert (await _chat(s, gw, key["api_key"], user="u-2"))[0] == 200


def test_a_keys_rate_limit_shows_the_end_user_limits() -> None:
    cfg = {**billing_config("http://127.0.0.1:9/v1"), "tiers": TIERS}
    tiers = parse_config(yaml.safe_dump(cfg), {}).tiers
    shown = rate_limit(tiers["per-user"])  # what `keys create` and the admin API print
    assert shown["user_requests_per_hour"] == 3 and shown["user_tokens_per_minute"] is None


@pytest.mark.parametrize("name", ["user_requests_per_hour", "user_tokens_per_minute"])
def test_user_limits_must_be_positive_integers(name: str) -> None:
    cfg = billing_config("http://127.0.0.1:9/v1")
    cfg["tiers"] = {"t": {"max_tokens": 10, name: 0}}
    with pytest.raises(ConfigError, match=f"tiers.t.{name}: must be a positive integer"):
        parse_config(yaml.safe_dump(cfg), {})
