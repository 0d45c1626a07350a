"""Billing follows the model that served (issue 13 items 1-3).

Real Postgres, keys on, a fake OpenAI upstream over HTTP whose reasoning
models refuse ``max_tokens`` like OpenAI's do (tests/fakes_models.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import orjson
import pytest
import yaml

from proxy.config.reader import ConfigError
from proxy.config.tiers import parse_prices
from proxy.core.pricing import price_usage
from proxy.core.usage import Usage, usage_from_openai
from proxy.pipeline.registry import parse_config
from proxy.providers.anthropic_translate import usage_json
from tests.billing_helpers import tenant_with_key, wait_for
from tests.conftest import Gateway, StartGateway
from tests.fakes_models import FakeModels

ROW = (
    "SELECT public_model, provider, provider_model, cost_usd, prompt_tokens, completion_tokens"
    " FROM usage_events WHERE request_id = $1"
)
COUNT = "SELECT count(*) FROM usage_events WHERE request_id = $1"
TIERS: dict[str, Any] = {
    "basic": {
        "requests_per_hour": 1000,
        "monthly_requests": 1000,
        "monthly_tokens": 1_000_000,
        "max_tokens": 100,
        "models": [
            *("gpt-4o", "cheap", "guarded", "gone", "o3-mini", "think"),
            *("small", "big", "narrow", "cached", "unpriced"),
        ],
    },
    "pro": {"requests_per_hour": 1000, "monthly_requests": 1000, "max_tokens": 4096},
}
SHORT = [{"role": "user", "content": "hi"}]
LONG = [{"role": "user", "content": "many words here " * 40}]


def _model(name: str, target: str, provider: str = "fake", **extra: Any) -> dict[str, Any]:
    return {"name": name, "targets": [{"provider": provider, "model": target}], **extra}


def config(url: str) -> dict[str, Any]:
    return {
        "auth": "keys",
        "providers": {
            "fake": {"kind": "openai", "base_url": url, "api_key": "sk-upstream"},
            "off": {"kind": "openai", "base_url": url, "api_key": "${OFF_KEY:-}"},
        },
        "models": [
            _model("gpt-4o", "error-503", fallbacks=["cheap"]),
            _model("cheap", "cheap-model"),
            _model("guarded", "error-503", fallbacks=["premium"]),
            _model("premium", "premium-model"),
            _model("gone", "anything", provider="off", fallbacks=["premium"]),
            _model("o3-mini", "o3-mini"),
            _model("think", "error-503", fallbacks=["o3-mini"]),
            _model("small", "tiny-ctx", context_window_fallbacks=["big"]),
            _model("big", "big-ctx"),
            _model("narrow", "tiny-ctx"),
            _model("cached", "cached-reasoner"),
            _model("unpriced", "mystery-model"),
        ],
        "model_families": [
            {"models": ["tiny-ctx"], "context_window": 60},
            {"models": ["big-ctx"], "context_window": 100_000},
        ],
        "tiers": TIERS,
        "prices": {
            "gpt-4o": {"prompt": 2.5, "completion": 10},
            "cheap-model": {"prompt": 1, "completion": 1},
            "premium-model": {"prompt": 5, "completion": 5},
            "fake/cached-reasoner": {
                "prompt": 1,
                "cached_prompt": 0.5,
                "completion": 4,
                "reasoning": 8,
            },
            "o3-*": {"prompt": 1, "completion": 4},
            "*-ctx": {"prompt": 1, "completion": 1},
        },
        "billing": {"flush_interval_ms": 10},
        "retry": {"backoff_base_ms": 1, "backoff_max_ms": 2},
    }


@pytest.fixture
async def fake() -> AsyncIterator[FakeModels]:
    server = await FakeModels().start()
    yield server
    await server.close()


@pytest.fixture
async def gw(start_gateway: StartGateway, fake: FakeModels, pg_url: str, tmp_path: Path) -> Gateway:
    return await start_gateway(config(fake.url), database_url=pg_url, data_dir=tmp_path)


async def key_of(pg: asyncpg.Pool, tmp_path: Path, tier: str = "basic") -> str:
    _, key = await tenant_with_key(pg, tmp_path, tier, set(TIERS))
    return str(key["api_key"])


async def chat(
    gw: Gateway, key: str, model: str, messages: list[Any] = SHORT, **extra: Any
) -> tuple[int, str, Any]:
    body = {"model": model, "messages": messages, **extra}
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base_url + "/chat/completions", json=body, headers=headers) as resp,
    ):
        return resp.status, resp.headers["x-request-id"], orjson.loads(await resp.read())


async def row(pg: asyncpg.Pool, request_id: str) -> asyncpg.Record:
    await wait_for(pg, COUNT, request_id, expect=1)
    found = await pg.fetchrow(ROW, request_id)
    assert found is not None
    return found


# ------------------------------------------------------------ served model


async def test_a_fallback_is_priced_at_the_model_that_served(
    gw: Gateway, fake: FakeModels, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    key = await key_of(pg, tmp_path)
    status, rid, _ = await chat(gw, key, "gpt-4o")
    assert status == 200 and fake.models() == ["error-503", "cheap-model"]
    r = await row(pg, rid)
    assert (r["public_model"], r["provider_model"]) == ("gpt-4o", "cheap-model")
    # 11 prompt + 6 completion tokens at cheap-model's $1/1M, not gpt-4o's $2.50/$10
    assert r["cost_usd"] == Decimal("0.000017")
    settled = gw.settler.records[-1]
    assert (settled.public_model, settled.served_model) == ("gpt-4o", "cheap")


async def test_a_tier_never_reaches_a_model_it_may_not_use_as_a_fallback(
    gw: Gateway, fake: FakeModels, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    key = await key_of(pg, tmp_path)
    status, _, body = await chat(gw, key, "guarded")  # its fallback is premium
    assert status >= 500 and "premium-model" not in fake.models()
    # A model whose own targets are all off and whose only fallback the tier
    # may not use: 403 before anything is forwarded.
    fake.seen.clear()
    status, _, body = await chat(gw, key, "gone")
    assert status == 403 and body["error"]["code"] == "model_not_allowed"
    assert fake.seen == []
    # A tier that may use premium gets there through the same fallback.
    pro = await key_of(pg, tmp_path, "pro")
    status, _, _ = await chat(gw, pro, "guarded")
    assert status == 200 and fake.models()[-1] == "premium-model"


# ------------------------------------------------------------ token limit parameter


async def test_a_reasoning_model_gets_max_completion_tokens(
    gw: Gateway, fake: FakeModels, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    key = await key_of(pg, tmp_path)
    client = openai.AsyncOpenAI(base_url=gw.base_url, api_key=key, max_retries=0)
    async with client:
        done = await client.chat.completions.create(model="o3-mini", messages=SHORT)  # type: ignore[arg-type]
        assert done.choices[0].message.content == "ok"
        sent = fake.seen[-1][1]
        assert sent["max_completion_tokens"] == 100 and "max_tokens" not in sent  # the tier cap
        await client.chat.completions.create(model="o3-mini", messages=SHORT, max_tokens=50)  # type: ignore[arg-type]
        sent = fake.seen[-1][1]
        assert sent["max_completion_tokens"] == 50 and "max_tokens" not in sent
    # Per target: the first attempt's model takes max_tokens, its fallback the other.
    fake.seen.clear()
    status, _, _ = await chat(gw, key, "think", max_tokens=40)
    assert status == 200
    (m1, first), (m2, second) = fake.seen
    assert (m1, first.get("max_tokens"), first.get("max_completion_tokens")) == (
        "error-503",
        40,
        None,
    )
    assert (m2, second.get("max_tokens"), second.get("max_completion_tokens")) == (
        "o3-mini",
        None,
        40,
    )


async def test_context_length_exceeded_before_forwarding(
    gw: Gateway, fake: FakeModels, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    key = await key_of(pg, tmp_path)
    status, _, body = await chat(gw, key, "narrow", LONG)
    assert status == 400 and fake.seen == []
    assert body["error"]["code"] == "context_length_exceeded"
    assert body["error"]["type"] == "invalid_request_error"
    assert "60 tokens" in body["error"]["message"]
    # The completion limit counts too: a short prompt plus 100 tokens is over 60.
    status, _, body = await chat(gw, key, "narrow", SHORT, max_tokens=100)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    # With no limit set, only the prompt must fit (the tier cap is a ceiling).
    assert (await chat(gw, key, "narrow", SHORT))[0] == 200
    assert fake.models() == ["tiny-ctx"]


async def test_context_window_fallbacks_take_a_long_request(
    gw: Gateway, fake: FakeModels, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    key = await key_of(pg, tmp_path)
    assert (await chat(gw, key, "small", SHORT))[0] == 200
    status, rid, _ = await chat(gw, key, "small", LONG)
    assert status == 200
    assert fake.models() == ["tiny-ctx", "big-ctx"]
    r = await row(pg, rid)
    assert (r["public_model"], r["provider_model"]) == ("small", "big-ctx")


# ------------------------------------------------------------ prices in full


async def test_cached_and_reasoning_tokens_are_priced(
    gw: Gateway, pg: asyncpg.Pool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tollway.access")
    key = await key_of(pg, tmp_path)
    status, rid, _ = await chat(gw, key, "cached")
    assert status == 200
    r = await row(pg, rid)
    # 200 fresh prompt x $1 + 800 cached x $0.50 + 200 output x $4 + 300 reasoning x $8
    assert r["cost_usd"] == Decimal("0.0038")
    line = next(orjson.loads(x.getMessage()) for x in caplog.records if x.name == "tollway.access")
    assert (line["cached_tokens"], line["reasoning_tokens"], line["cost_usd"]) == (800, 300, 0.0038)


async def test_an_unpriced_model_costs_null_not_zero(
    gw: Gateway, pg: asyncpg.Pool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tollway")
    key = await key_of(pg, tmp_path)
    ids = [(await chat(gw, key, "unpriced"))[1] for _ in range(2)]
    for rid in ids:
        r = await row(pg, rid)
        assert r["prompt_tokens"] == 11 and r["cost_usd"] is None
    access = [orjson.loads(x.getMessage()) for x in caplog.records if x.name == "tollway.access"]
    assert [a["cost_usd"] for a in access if a["model"] == "unpriced"] == [None, None]
    warned = [x for x in caplog.records if x.name == "tollway.prices"]
    assert len(warned) == 1 and "mystery-model" in warned[0].getMessage()
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/metrics") as resp:
        text = await resp.text()
    assert 'tollway_unpriced_requests_total{provider="fake",served_model="unpriced"} 2' in text


# ------------------------------------------------------------ config


def test_anthropic_cache_reads_and_writes_have_their_own_prices() -> None:
    """Anthropic's usage arrives as OpenAI's (cached_tokens = reads,
    cache_write_tokens = writes, both inside prompt_tokens)."""
    raw = {"input_tokens": 100, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 200}
    usage = usage_from_openai(usage_json({**raw, "output_tokens": 50}))
    assert isinstance(usage, Usage) and usage.prompt_tokens == 1300
    prices = parse_prices(
        {"claude-*": {"prompt": 3, "cached_prompt": 0.3, "cache_write": 3.75, "completion": 15}}
    )
    cost = price_usage(prices, usage, "anthropic", "claude-x", "claude-x")
    assert cost == (Decimal(100 * 3) + Decimal("300") + Decimal(750) + Decimal(50 * 15)) / 10**6


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"model_families": [{"models": ["x"], "token_limit": "max_output"}]}, "token_limit"),
        ({"model_families": [{"models": ["x"], "context_window": 0}]}, "context_window"),
        ({"model_families": [{"models": []}]}, "models"),
        ({"prices": {"m": {"prompt": 1, "cached": 1}}}, "prices.m"),
        ({"prices": {"m": {"reasoning": -1}}}, "prices.m.reasoning"),
    ],
)
def test_bad_families_and_prices_name_their_key(section: dict[str, Any], message: str) -> None:
    cfg = {**config("http://127.0.0.1:9/v1"), **section}
    with pytest.raises(ConfigError, match=message):
        parse_config(yaml.safe_dump(cfg), {})
