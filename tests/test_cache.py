"""The exact response cache against a real Redis: hit/miss, what is cached,
client opt-in/out, scopes, stream replay, billing of hits."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import yaml

from proxy.config.model import ConfigError
from proxy.core.sse import event_data
from proxy.core.usage import Usage
from proxy.pipeline.registry import parse_config
from proxy.stages.cache.replay import assemble, replay_events
from proxy.stages.cache.store import fingerprint
from proxy.web.keys import REDIS
from tests.billing_helpers import billing_config, tenant_with_key, wait_for
from tests.conftest import Gateway, StartGateway, gateway_config
from tests.db import unique
from tests.fakes import WORDS, FakeOpenAI
from tests.waiting import until

CACHE: dict[str, Any] = {"enabled": True, "ttl_s": 60}


def _msg() -> list[dict[str, str]]:
    return [{"role": "user", "content": unique("prompt")}]  # the session Redis is shared


async def _post(
    gw: Gateway, body: dict[str, Any], key: str = "", path: str = "/chat/completions", **hdr: str
) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update({k.replace("_", "-"): v for k, v in hdr.items()})
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base_url + path, json=body, headers=headers) as r,
    ):
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


async def _open(
    start_gateway: StartGateway, fake: FakeOpenAI, redis_url: str, **cache: Any
) -> Gateway:
    return await start_gateway(
        gateway_config(fake.url, cache={**CACHE, **cache}), redis_url=redis_url
    )


async def _settled(gw: Gateway, n: int) -> None:
    await until(lambda: len(gw.settler.records) >= n, interval=0.01)


async def _stored(gw: Gateway, body: dict[str, Any], limit: float = 5.0) -> None:
    """Wait for the background write of a miss (a hit proves it)."""

    async def hit() -> bool:
        return (await _post(gw, body))[1]["x-tollway-cache"] == "hit"

    await until(hit, limit, interval=0.01)


async def test_second_identical_request_is_a_hit(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, redis_url: str
) -> None:
    gw = await _open(start_gateway, fake_openai, redis_url)
    body = {"model": "fake-model", "messages": _msg(), "temperature": 0}
    status, headers, first = await _post(gw, body)
    assert (status, headers["x-tollway-cache"]) == (200, "miss")
    await gw.app[REDIS].settled()  # the miss's background store
    seen = len(fake_openai.seen)
    status, headers, again = await _post(gw, {**body, "user": "someone-else"})
    assert (status, headers["x-tollway-cache"]) == (200, "hit")
    assert again == first and len(fake_openai.seen) == seen  # no provider involved
    assert "x-tollway-provider" not in headers and headers["x-request-id"]
    await _settled(gw, 2)
    hit = gw.settler.records[-1]
    assert hit.cached and hit.status == 200 and hit.usage.total_tokens == 0
    emb = {"model": "fake-model", "input": unique("text")}
    assert (await _post(gw, emb, path="/embeddings"))[1]["x-tollway-cache"] == "miss"
    await gw.app[REDIS].settled()  # the miss's background store
    assert (await _post(gw, emb, path="/embeddings"))[1]["x-tollway-cache"] == "hit"


@pytest.mark.parametrize(
    ("extra", "cache", "cached"),
    [
        ({"temperature": 0.7}, {}, False),
        ({}, {}, False),  # no temperature: not deterministic unless configured
        ({}, {"unset_temperature": True}, True),
        ({"temperature": 0, "n": 2}, {}, False),
        ({"temperature": 0.7}, {"deterministic_only": False}, True),
    ],
)
async def test_only_deterministic_requests_by_default(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    redis_url: str,
    extra: dict[str, Any],
    cache: dict[str, Any],
    cached: bool,
) -> None:
    gw = await _open(start_gateway, fake_openai, redis_url, **cache)
    body = {"model": "fake-model", "messages": _msg(), **extra}
    assert (await _post(gw, body))[1]["x-tollway-cache"] == ("miss" if cached else "bypass")
    await gw.app[REDIS].settled()  # the miss's background store
    assert (await _post(gw, body))[1]["x-tollway-cache"] == ("hit" if cached else "bypass")


async def test_client_header_and_per_model_opt_out(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, redis_url: str
) -> None:
    gw = await _open(start_gateway, fake_openai, redis_url, models={"echo": {"enabled": False}})
    body = {"model": "fake-model", "messages": _msg(), "temperature": 0}
    assert (await _post(gw, body, x_tollway_cache="no-store"))[1]["x-tollway-cache"] == "bypass"
    await gw.app[REDIS].settled()  # any background store (none is expected)
    assert (await _post(gw, body))[1]["x-tollway-cache"] == "miss"  # no-store wrote nothing
    hot = {"model": "fake-model", "messages": _msg(), "temperature": 1.2}
    assert (await _post(gw, hot, x_tollway_cache="force"))[1]["x-tollway-cache"] == "miss"
    await gw.app[REDIS].settled()  # the miss's background store
    assert (await _post(gw, hot, x_tollway_cache="FORCE"))[1]["x-tollway-cache"] == "hit"
    assert (await _post(gw, hot))[1]["x-tollway-cache"] == "bypass"
    echo = {"model": "echo", "messages": _msg(), "temperature": 0}
    assert (await _post(gw, echo))[1]["x-tollway-cache"] == "bypass"
    status, _, raw = await _post(gw, body, x_tollway_cache="maybe")
    assert status == 400
    assert orjson.loads(raw)["error"]["param"] == "x-tollway-cache"


async def test_entries_are_per_tenant_unless_shared(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    redis_url: str,
    tmp_path: Path,
) -> None:
    cfg = billing_config(fake_openai.url)
    cfg["cache"] = {**CACHE, "models": {"fake-shared": {"scope": "shared"}}}
    gw = await start_gateway(cfg, database_url=pg_url, data_dir=tmp_path, redis_url=redis_url)
    _, alice = await tenant_with_key(pg, tmp_path, "pro")
    _, bob = await tenant_with_key(pg, tmp_path, "pro")
    own = {"model": "fake-model", "messages": _msg(), "temperature": 0}
    shared = {**own, "model": "fake-shared"}
    for body, bob_sees in ((own, "miss"), (shared, "hit")):
        assert (await _post(gw, body, alice["api_key"]))[1]["x-tollway-cache"] == "miss"
        await gw.app[REDIS].settled()  # the miss's background store
        assert (await _post(gw, body, alice["api_key"]))[1]["x-tollway-cache"] == "hit"
        assert (await _post(gw, body, bob["api_key"]))[1]["x-tollway-cache"] == bob_sees


async def test_stream_and_non_stream_share_entries(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, redis_url: str
) -> None:
    gw = await _open(start_gateway, fake_openai, redis_url)
    client = gw.sdk()
    text = "".join(WORDS)
    # A streamed miss is stored whole ...
    body = {"model": "fake-model", "messages": _msg(), "temperature": 0}
    stream = await client.chat.completions.create(**body, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == text
    await _stored(gw, body)
    _, headers, raw = await _post(gw, body)
    reply = orjson.loads(raw)
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": text, "refusal": None}
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["total_tokens"] == 17  # the provider's count, kept with the entry
    # ... and a hit is replayed as a proper SSE stream, usage chunk on request.
    chunks = [
        c
        async for c in await client.chat.completions.create(
            **body, stream=True, stream_options={"include_usage": True}
        )
    ]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 17
    _, headers, raw = await _post(gw, {**body, "stream": True})
    assert headers["x-tollway-cache"] == "hit"
    assert headers["content-type"].startswith("text/event-stream")
    assert raw.endswith(b"data: [DONE]\n\n") and b'"usage"' not in raw
    # A non-stream miss serves a stream hit too.
    other = {"model": "fake-model", "messages": _msg(), "temperature": 0}
    await _post(gw, other)
    await _stored(gw, other)
    replay = await client.chat.completions.create(**other, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in replay if c.choices]) == text


async def test_errors_cut_streams_and_oversized_answers_are_not_stored(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, redis_url: str
) -> None:
    gw = await _open(start_gateway, fake_openai, redis_url)
    error = {"model": "fake-error-400", "messages": _msg(), "temperature": 0}
    cut = {"model": "fake-cut", "messages": _msg(), "temperature": 0, "stream": True}
    for _ in range(2):
        assert (await _post(gw, error))[0] == 400
        _, headers, raw = await _post(gw, cut)
        assert headers["x-tollway-cache"] == "miss" and b"upstream_stream_broken" in raw
        await gw.app[REDIS].settled()  # any background store (none is expected)
    assert len(fake_openai.seen) == 4
    small = await _open(start_gateway, fake_openai, redis_url, max_entry_bytes=64)
    body = {"model": "fake-model", "messages": _msg(), "temperature": 0}
    for _ in range(2):
        assert (await _post(small, body))[1]["x-tollway-cache"] == "miss"
        await small.app[REDIS].settled()  # the miss's background store


async def test_entries_expire_after_their_ttl(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, redis_url: str
) -> None:
    gw = await _open(start_gateway, fake_openai, redis_url, models={"fake-*": {"ttl_s": 0.3}})
    body = {"model": "fake-model", "messages": _msg(), "temperature": 0}
    await _post(gw, body)
    await _stored(gw, body)
    await asyncio.sleep(0.35)  # time is the condition: past the entry's TTL
    assert (await _post(gw, body))[1]["x-tollway-cache"] == "miss"


async def test_hot_entries_are_served_from_the_process_for_local_ttl_s(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, redis_url: str
) -> None:
    # long enough that the checks below fit in it on a loaded machine
    gw = await _open(start_gateway, fake_openai, redis_url, local_ttl_s=1.0)
    body = {"model": "fake-model", "messages": _msg(), "temperature": 0}
    await _post(gw, body)
    await _stored(gw, body)
    await gw.app[REDIS].client.delete(f"tw:cache:{{gw}}:{fingerprint('chat', 'fake-model', body)}")
    assert (await _post(gw, body))[1]["x-tollway-cache"] == "hit"  # from this process
    await asyncio.sleep(1.05)  # time is the condition: past local_ttl_s
    assert (await _post(gw, body))[1]["x-tollway-cache"] == "miss"


@pytest.mark.parametrize(("policy", "tokens"), [("request", 17), ("tokens", 34)])
async def test_cache_hits_are_billed_by_policy(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    redis_url: str,
    tmp_path: Path,
    policy: str,
    tokens: int,
) -> None:
    cfg = billing_config(fake_openai.url)
    cfg["cache"] = {**CACHE, "hit_billing": policy}
    gw = await start_gateway(cfg, database_url=pg_url, data_dir=tmp_path, redis_url=redis_url)
    tenant, key = await tenant_with_key(pg, tmp_path, "pro")
    body = {"model": "fake-model", "messages": _msg(), "temperature": 0}
    assert (await _post(gw, body, key["api_key"]))[1]["x-tollway-cache"] == "miss"
    await gw.app[REDIS].settled()  # the miss's background store
    status, headers, _ = await _post(gw, body, key["api_key"])
    assert (status, headers["x-tollway-cache"]) == (200, "hit")
    assert headers["x-ratelimit-remaining-requests"] == "998"  # a hit is a request
    counters = (
        "SELECT (requests_used, tokens_used) FROM quota_counters c"
        " JOIN tenants t ON t.id = c.tenant_id WHERE t.name = $1"
    )
    await wait_for(pg, counters, tenant, expect=(2, tokens))
    row = await pg.fetchrow(
        "SELECT e.* FROM usage_events e JOIN tenants t ON t.id = e.tenant_id"
        " WHERE t.name = $1 AND e.cached",
        tenant,
    )
    assert row["counted"] and row["status"] == 200 and row["provider"] is None
    assert row["prompt_tokens"] + row["completion_tokens"] == tokens - 17
    assert (float(row["cost_usd"]) > 0) == (policy == "tokens")


def test_fingerprint_ignores_what_does_not_change_the_answer() -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "temperature": 0, "n": 1}
    same = {"temperature": 0, "messages": [{"role": "user", "content": "x"}], "stream": True}
    base = fingerprint("chat", "m", body)
    assert fingerprint("chat", "m", {**same, "user": "u", "stream_options": {}}) == base
    assert fingerprint("chat", "m2", body) != base
    assert fingerprint("completions", "m", body) != base
    assert fingerprint("chat", "m", {**body, "temperature": 0.5}) != base
    assert fingerprint("chat", "m", {**body, "tools": [{"type": "function"}]}) != base


def test_tool_call_streams_assemble_and_replay() -> None:
    head = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    deltas = [
        {"role": "assistant", "content": None},
        {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {}}]},
        {"tool_calls": [{"index": 0, "function": {"name": "get_", "arguments": '{"ci'}}]},
        {"tool_calls": [{"index": 0, "function": {"name": "weather", "arguments": 'ty":1}'}}]},
    ]
    payloads = [
        orjson.dumps({**head, "choices": [{"index": 0, "delta": d, "finish_reason": None}]})
        for d in deltas
    ]
    payloads.append(
        orjson.dumps(
            {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
        )
    )
    whole = assemble(payloads, "chat", Usage(3, 4, "provider"))
    assert whole is not None
    reply = orjson.loads(whole)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather"}}
    call["function"]["arguments"] = '{"city":1}'  # type: ignore[index]
    assert reply["choices"][0]["message"] == {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [call],
    }
    assert reply["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    events = [e + b"\n\n" for e in replay_events(whole, "chat", True).split(b"\n\n") if e]
    chunks = [orjson.loads(d) for d in map(event_data, events) if d and d != b"[DONE]"]
    assert chunks[0]["choices"][0]["delta"]["tool_calls"] == [{"index": 0, **call}]
    assert chunks[1]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[2]["choices"] == [] and chunks[2]["usage"]["total_tokens"] == 7


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        ({"ttl": 5}, "cache.ttl: unknown key"),
        ({"ttl_s": 0}, "cache.ttl_s: must be a number > 0"),
        ({"scope": "global"}, "cache.scope: must be one of: tenant, shared"),
        ({"hit_billing": "free"}, "cache.hit_billing: must be one of: request, tokens"),
        ({"enabled": "yes"}, "cache.enabled: must be true or false"),
        ({"models": {"gpt-*": {"ttl_s": -1}}}, "cache.models.gpt-*.ttl_s: must be a number > 0"),
        ({"models": {"gpt-*": {"tll_s": 1}}}, "cache.models.gpt-*.tll_s: unknown key"),
    ],
)
def test_cache_config_errors_name_the_key_path(cache: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(yaml.safe_dump(gateway_config("http://127.0.0.1:1/v1", cache=cache)), {})
    assert str(err.value).startswith(message)
