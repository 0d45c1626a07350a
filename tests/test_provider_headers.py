"""A provider's own headers (``providers.<name>.headers``, its key) reach
it as the config says, with the request's own X-Request-Id; a configured
header that would break the request's header lines is refused."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.conftest import StartGateway, gateway_config
from tests.fakes import FakeOpenAI

MSG = [{"role": "user", "content": "hi"}]


def _config(fake: FakeOpenAI, headers: dict[str, str]) -> dict[str, Any]:
    cfg = gateway_config(fake.url)
    cfg["providers"]["fake"]["headers"] = headers
    return cfg


async def test_configured_headers_reach_the_provider_with_the_requests_own(
    start_gateway: StartGateway, fake_openai: FakeOpenAI
) -> None:
    gw = await start_gateway(_config(fake_openai, {"X-Team": "tollway", "X-Request-Id": "fixed"}))
    async with aiohttp.ClientSession() as s:
        for _ in range(2):  # the second request: the same block, its own id
            async with s.post(
                gw.url + "/v1/chat/completions", json={"model": "fake-model", "messages": MSG}
            ) as r:
                assert r.status == 200
    first, second = fake_openai.seen[-2:]
    for seen in (first, second):
        assert seen.headers["X-Team"] == "tollway"
        assert seen.headers["Authorization"] == "Bearer sk-provider-secret"
        # (aiohttp spells the name its own way)
        assert seen.headers["X-Request-ID"].startswith("req_")  # the request's replaces it
    assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]


async def test_a_configured_header_with_a_line_break_is_refused(
    start_gateway: StartGateway, fake_openai: FakeOpenAI
) -> None:
    gw = await start_gateway(_config(fake_openai, {"X-Team": "a\r\nX-Smuggled: 1"}))
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.url + "/v1/chat/completions", json={"model": "fake-model", "messages": MSG}) as r,
    ):
        status = r.status
    assert status >= 500
    assert fake_openai.seen == []  # nothing was sent
