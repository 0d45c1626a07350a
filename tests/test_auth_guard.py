"""One credential per request, and failed authentications throttled per
client address (``proxy/auth_guard.py``), on the real app with Postgres."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import yaml
from multidict import CIMultiDict

from proxy.config.reader import ConfigError
from proxy.pipeline.registry import parse_config
from proxy.stores import apikeys
from proxy.web.keys import AUTH_GUARD
from tests.billing_helpers import billing_config, tenant_with_key
from tests.conftest import Gateway, StartGateway
from tests.fakes import FakeOpenAI

BODY = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}


async def chat(gw: Gateway, headers: CIMultiDict[str] | dict[str, str]) -> tuple[int, Any, dict]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.url + "/v1/chat/completions", json=BODY, headers=headers) as r,
    ):
        return r.status, r.headers, orjson.loads(await r.read())


def bearer(key: str, xff: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}"}
    if xff is not None:
        headers["X-Forwarded-For"] = xff
    return headers


async def start(
    start_gateway: StartGateway,
    fake: FakeOpenAI,
    pg_url: str,
    tmp_path: Path,
    *,
    redis_url: str | None = None,
    **server: Any,
) -> Gateway:
    cfg = billing_config(fake.url)
    cfg["server"] = server
    cfg["ratelimit"] = {"auth_failures": {"max_failures": 5, "window_s": 60}}
    return await start_gateway(cfg, database_url=pg_url, data_dir=tmp_path, redis_url=redis_url)


@pytest.mark.parametrize("order", ["valid-first", "junk-first"])
async def test_two_authorization_headers_are_refused(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
    order: str,
) -> None:
    gw = await start(start_gateway, fake_openai, pg_url, tmp_path)
    _, key = await tenant_with_key(pg, tmp_path, "pro")
    values = [f"Bearer {key['api_key']}", "Bearer junk"]
    if order == "junk-first":
        values.reverse()
    headers = CIMultiDict([("Authorization", v) for v in values])
    status, _, body = await chat(gw, headers)
    assert status == 400
    assert "more than one Authorization header" in body["error"]["message"]
    assert key["api_key"] not in str(body)
    # Two x-api-key headers too, even beside a valid Authorization.
    twice = CIMultiDict(
        [("Authorization", f"Bearer {key['api_key']}"), ("x-api-key", "a"), ("x-api-key", "b")]
    )
    status, _, body = await chat(gw, twice)
    assert status == 400 and "x-api-key" in body["error"]["message"]
    assert (await chat(gw, bearer(key["api_key"])))[0] == 200


async def test_a_key_in_x_api_key_authenticates_like_a_bearer(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    """Anthropic's SDK sends its key as ``x-api-key``; a bad one is a 401 as usual."""
    gw = await start(start_gateway, fake_openai, pg_url, tmp_path)
    _, key = await tenant_with_key(pg, tmp_path, "pro")
    assert (await chat(gw, {"x-api-key": key["api_key"]}))[0] == 200
    status, _, body = await chat(gw, {"x-api-key": "tw-not-a-key"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


async def test_failed_authentications_are_throttled_per_address(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    """Behind a trusted proxy (the test client, 127.0.0.1) the address is the
    one X-Forwarded-For names: the guesser at 127.0.0.2 is stopped after 5
    failures, a valid key from 127.0.0.3 is not affected."""
    gw = await start(start_gateway, fake_openai, pg_url, tmp_path, trusted_proxies=["127.0.0.1"])
    _, key = await tenant_with_key(pg, tmp_path, "pro")
    for _ in range(5):
        status, _, _ = await chat(gw, bearer(apikeys.generate(), "127.0.0.2"))
        assert status == 401
    status, headers, body = await chat(gw, bearer(apikeys.generate(), "127.0.0.2"))
    assert status == 429
    assert int(headers["retry-after"]) >= 1
    assert body["error"]["code"] == "auth_failures_exceeded"
    # Even a valid key from the throttled address waits.
    assert (await chat(gw, bearer(key["api_key"], "127.0.0.2")))[0] == 429
    # Another address is not affected; a proxy chain names the right-most untrusted hop.
    assert (await chat(gw, bearer(key["api_key"], "127.0.0.3")))[0] == 200
    assert (await chat(gw, bearer(key["api_key"], "127.0.0.2, 127.0.0.3")))[0] == 200
    assert gw.app[AUTH_GUARD].throttled == 2
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/metrics") as r:
        assert "tollway_auth_failures_throttled_total 2" in await r.text()


async def test_an_untrusted_peer_cannot_choose_its_address(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, pg_url: str, tmp_path: Path
) -> None:
    gw = await start(start_gateway, fake_openai, pg_url, tmp_path)  # no trusted proxies
    statuses = [
        (await chat(gw, bearer(apikeys.generate(), f"127.0.0.{10 + i}")))[0] for i in range(7)
    ]
    assert statuses == [401] * 5 + [429] * 2


async def test_failures_are_shared_through_redis(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    tmp_path: Path,
    redis_url: str,
) -> None:
    """Two workers (two apps) on one Redis count the same address's failures."""
    proxies = ["127.0.0.1"]
    one = await start(
        start_gateway, fake_openai, pg_url, tmp_path, redis_url=redis_url, trusted_proxies=proxies
    )
    two = await start(
        start_gateway, fake_openai, pg_url, tmp_path, redis_url=redis_url, trusted_proxies=proxies
    )
    address = f"127.1.{secrets.randbelow(256)}.{secrets.randbelow(256)}"  # unused so far
    for gw in (one, two, one, two, one):
        assert (await chat(gw, bearer(apikeys.generate(), address)))[0] == 401
    assert (await chat(two, bearer(apikeys.generate(), address)))[0] == 429


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"ratelimit": {"auth_failures": {"max_failure": 3}}},
            "ratelimit.auth_failures.max_failure",
        ),
        ({"ratelimit": {"auth_failures": {"window_s": 0}}}, "ratelimit.auth_failures.window_s"),
        ({"server": {"trusted_proxies": ["not-an-ip"]}}, "server.trusted_proxies[0]"),
        ({"server": {"header_timeout_s": -1}}, "server.header_timeout_s"),
    ],
)
def test_config_is_strict(section: dict[str, Any], message: str) -> None:
    cfg = {"auth": "none", "providers": {"echo": {"kind": "echo"}}, **section}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(yaml.safe_dump(cfg), {})
