"""Provider limits from the YAML, shared through Redis: over a limit the next
target is tried; with none left, a 429/503 with retry-after."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from proxy.web.keys import REDIS
from tests.conftest import Gateway, StartGateway
from tests.db import unique
from tests.fakes import FakeOpenAI
from tests.waiting import until


def _config(fake: FakeOpenAI, limits: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Providers get fresh names: the session Redis keeps their windows a minute."""
    main, spare = unique("p"), unique("q")
    provider = {"kind": "openai", "base_url": fake.url, "api_key": "sk-x"}
    cfg = {
        "auth": "none",
        "providers": {main: provider, spare: provider},
        "models": [
            {"name": "limited", "targets": [{"provider": main, "model": "m1"}]},
            {"name": "spilled", "targets": [{"provider": main}], "fallbacks": ["backup"]},
            {"name": "backup", "targets": [{"provider": spare, "model": "m2"}]},
            {"name": "fake-*", "targets": [{"provider": main}]},
        ],
        "ratelimit": {"providers": {k.replace("P", main): v for k, v in limits.items()}},
    }
    return cfg, main


async def _chat(gw: Gateway, model: str, **extra: Any) -> tuple[int, dict[str, str], Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base_url + "/chat/completions", json=body) as r,
    ):
        return r.status, {k.lower(): v for k, v in r.headers.items()}, orjson.loads(await r.read())


async def test_over_rpm_goes_to_the_next_target_then_429(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, redis_url: str
) -> None:
    cfg, main = _config(fake_openai, {"P": {"rpm": 2}})
    gw = await start_gateway(cfg, redis_url=redis_url)
    other = await start_gateway(cfg, redis_url=redis_url)  # a second instance, same limit
    served = [(await _chat(g, "spilled"))[1]["x-tollway-provider"] for g in (gw, other, gw)]
    assert served[:2] == [main, main] and served[2] != main  # the fallback took the third
    status, headers, body = await _chat(other, "limited")
    assert status == 429 and 0 < int(headers["retry-after"]) <= 61
    assert body["error"]["code"] == "provider_rate_limited"
    assert body["error"]["message"].startswith(
        f"provider '{main}' is at its configured limit of 2 requests per minute"
    )


async def test_target_tpm_counts_prompt_and_max_tokens(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, redis_url: str
) -> None:
    cfg, main = _config(fake_openai, {"P/m1": {"tpm": 150}})
    gw = await start_gateway(cfg, redis_url=redis_url)
    assert (await _chat(gw, "limited", max_tokens=100))[0] == 200
    status, _, body = await _chat(gw, "limited", max_tokens=100)
    assert status == 429
    assert (
        f"target '{main}/m1' is at its configured limit of 150 tokens" in body["error"]["message"]
    )
    assert (await _chat(gw, "fake-model", max_tokens=100))[0] == 200  # other targets are free


async def test_max_concurrency_holds_until_the_stream_closes(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, redis_url: str
) -> None:
    cfg, main = _config(fake_openai, {"P": {"max_concurrency": 1}})
    gw = await start_gateway(cfg, redis_url=redis_url)
    body = {"model": "fake-held", "messages": [{"role": "user", "content": "x"}], "stream": True}
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base_url + "/chat/completions", json=body) as r,
    ):
        assert r.status == 200
        await r.content.readline()  # the stream is open and holds the one slot
        status, headers, err = await _chat(gw, "limited")
        assert (status, headers["retry-after"], err["error"]["code"]) == (503, "1", "provider_busy")
        assert (await _chat(gw, "spilled"))[1]["x-tollway-provider"] != main
        fake_openai.release.set()
        await r.read()

    async def served() -> bool:  # the slot is given back once the stream closed
        return (await _chat(gw, "limited"))[0] == 200

    await until(served, 5, interval=0.01)
    assert gw.app[REDIS].up
