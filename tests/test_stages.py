"""The plugin model: a stage's section, its hooks, their order, the harness."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web

from proxy.config import model
from proxy.config.reader import ConfigError
from proxy.core.usage import Usage
from proxy.pipeline import registry
from proxy.pipeline.snapshot import hooks_for
from proxy.providers.base import Reply
from proxy.stages.base import ChunkFilter, Exchange, Stage
from proxy.stages.cache.stage import ResponseCacheStage
from proxy.stores.redis_client import RedisOptions, SharedRedis
from proxy.web.app import build_app
from proxy.web.server import make_runner
from tests.stage_harness import BASE, StageHarness

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello secret world"}]}


class Recorder(Stage):
    """Notes every hook it is called on; answers when asked to by a header."""

    name = "recorder"
    section = "recorder"
    calls: list[str]

    def __init__(self) -> None:
        self.calls = []

    @classmethod
    def configure(cls, raw: Any, config: model.Config) -> dict[str, Any] | None:
        if raw is None:
            return None
        if not isinstance(raw, dict) or set(raw) - {"tag"}:
            raise ConfigError("recorder: only 'tag' is allowed")
        return raw

    async def on_request(self, ex: Exchange, settings: dict[str, Any]) -> web.Response | None:
        self.calls.append(f"request:{settings.get('tag')}")
        if "x-answer" in ex.request.headers:
            return web.json_response({"answered_by": settings.get("tag")})
        return None

    def on_reply(self, ex: Exchange, settings: Any, reply: Reply) -> Reply:
        self.calls.append("reply")
        return reply

    def on_settle(self, ex: Exchange, settings: Any) -> None:
        self.calls.append(f"settle:{ex.record.status}")


class Censor(Stage):
    """Always on (no section): a stream filter that masks a word."""

    name = "censor"

    def on_stream(self, ex: Exchange, settings: Any) -> ChunkFilter:
        class Mask:
            def feed(self, data: bytes) -> bytes:
                return data.replace(b"secret", b"******")

        return Mask()


SECTIONS = [model.Section("recorder", Recorder.configure)]


def _config(**extra: Any) -> model.Config:
    return model.parse_config(yaml.safe_dump({**BASE, **extra}), {}, SECTIONS)


def test_a_stage_section_is_a_key_only_while_the_stage_is_registered() -> None:
    assert _config(recorder={"tag": "a"}).section("recorder") == {"tag": "a"}
    with pytest.raises(ConfigError, match="recorder"):
        model.parse_config(yaml.safe_dump({**BASE, "recorder": {"tag": "a"}}), {})
    # The shipped registry knows the cache's section; its errors name the key path.
    with pytest.raises(ConfigError, match=r"cache\.ttl_s"):
        registry.parse_config(yaml.safe_dump({**BASE, "cache": {"ttl_s": -1}}))


def test_a_disabled_stage_is_on_no_hook_list() -> None:
    """Absent section: the pipeline never calls the stage, so it costs nothing."""
    stage = Recorder()
    off = hooks_for(_config(), [stage])
    assert (off.request, off.reply, off.stream, off.settle) == ((), (), (), ())
    on = hooks_for(_config(recorder={"tag": "a"}), [stage])
    assert [s for s, _ in on.request] == [stage] and [s for s, _ in on.settle] == [stage]
    assert on.stream == ()  # Recorder does not override on_stream


async def _serve(config: model.Config, stages: list[Stage]) -> tuple[web.AppRunner, str]:
    runner = make_runner(build_app(config, stages=stages))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/v1/chat/completions"


async def test_hooks_run_in_registry_order_and_a_stage_may_answer() -> None:
    first, second = Recorder(), Recorder()
    config = _config(recorder={"tag": "x"})
    runner, url = await _serve(config, [first, second])
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(url, json=CHAT) as r:
                assert r.status == 200
                assert (await r.json())["object"] == "chat.completion"
            async with http.post(url, json=CHAT, headers={"x-answer": "1"}) as r:
                assert r.status == 200 and await r.json() == {"answered_by": "x"}
    finally:
        await runner.cleanup()
    # Forwarded: request, reply, settle. Answered by the first: the second never saw it.
    assert first.calls == ["request:x", "reply", "settle:200", "request:x", "settle:200"]
    assert second.calls == ["request:x", "reply", "settle:200", "settle:200"]


async def test_a_stream_passes_every_chunk_filter() -> None:
    runner, url = await _serve(_config(), [Censor()])
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(url, json={**CHAT, "stream": True}) as r:
                text = (await r.read()).decode()
    finally:
        await runner.cleanup()
    assert "data: [DONE]" in text and "******" in text and "secret" not in text


async def test_the_harness_drives_the_cache_stage_alone(redis_url: str) -> None:
    """Miss, keep the reply, then the same request is a hit served by the stage."""
    redis = SharedRedis(RedisOptions(redis_url, timeout_s=1.0))
    try:
        async with StageHarness(ResponseCacheStage, {"enabled": True}, redis) as h:
            assert h.enabled
            body = {**CHAT, "temperature": 0, "messages": [{"role": "user", "content": "h1"}]}
            ex = h.exchange(body)
            assert await h.request(ex) is None and ex.headers["x-tollway-cache"] == "miss"
            answer = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion"})
            ex.record.provider_model, ex.record.usage = "m", Usage(3, 2)
            h.reply(ex, Reply(answer, Usage(3, 2)))
            h.settle(ex)
            await redis.settled()
            again = h.exchange(body)
            hit = await h.request(again)
            assert isinstance(hit, web.Response) and hit.body == answer
            assert again.record.cached and again.headers["x-tollway-cache"] == "hit"
    finally:
        await redis.close()


def test_the_cache_is_off_without_its_section() -> None:
    assert not StageHarness(ResponseCacheStage).enabled
    assert not StageHarness(ResponseCacheStage, {"enabled": False}).enabled
