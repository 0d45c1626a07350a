"""The semantic cache on the real embedded Postgres with pgvector: paraphrase
hits, what never matches, bypasses, TTL, the cap, a failing embedding
provider, SSE replay, and the usage rows of hits and embedding calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import yaml
from aiohttp import web

from proxy.config.model import ConfigError
from proxy.core.sse import event_data
from proxy.pipeline.registry import parse_config
from proxy.stages.semcache.stage import SemanticCacheStage
from proxy.web.keys import STAGES
from tests.billing_helpers import billing_config, tenant_with_key, wait_for
from tests.conftest import Gateway, StartGateway
from tests.fakes import FakeOpenAI
from tests.loopback import serve_app
from tests.schema import validate
from tests.test_cli import _env, _tollway
from tests.test_reload import write_atomically

Q1 = "What is the capital of France?"
Q2 = "Whats the capital of France?"  # a paraphrase: cosine ~0.89 with the echo vectors
SEMANTIC: dict[str, Any] = {
    "enabled": True,
    "embedding_model": "echo",
    "threshold": 0.87,
    "ttl_s": 60,
    "embedding_billing": "tenant",
}


def _config(provider_url: str, **semantic: Any) -> dict[str, Any]:
    cfg = billing_config(provider_url)
    cfg["semantic_cache"] = {**SEMANTIC, **semantic}
    return cfg


def _chat(text: str, *earlier: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "echo", "messages": [*earlier, {"role": "user", "content": text}], **extra}


async def _post(gw: Gateway, key: str, body: dict[str, Any], **hdr: str) -> Any:
    headers = {"Authorization": f"Bearer {key}", **hdr}
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base_url + "/chat/completions", json=body, headers=headers) as r,
    ):
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


def _content(raw: bytes) -> str:
    return str(orjson.loads(raw)["choices"][0]["message"]["content"])


async def _rows(pg: asyncpg.Pool, scope: str, n: int, live: bool = False) -> None:
    where = " AND expires_at > now()" if live else ""
    query = f"SELECT count(*) FROM semantic_cache WHERE scope = $1{where}"
    await wait_for(pg, query, scope, expect=n)


def _stage(gw: Gateway) -> SemanticCacheStage:
    return next(s for s in gw.app[STAGES] if isinstance(s, SemanticCacheStage))


@pytest.fixture
async def setup(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> Any:
    async def start(**semantic: Any) -> tuple[Gateway, str, str]:
        gw = await start_gateway(
            _config(fake_openai.url, **semantic), database_url=pg_url, data_dir=tmp_path
        )
        tenant, key = await tenant_with_key(pg, tmp_path, "pro")
        tenant_id = await pg.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
        return gw, key["api_key"], f"t{tenant_id}"

    return start


async def test_a_paraphrase_is_a_semantic_hit_billed_as_a_request(
    setup: Any, pg: asyncpg.Pool
) -> None:
    gw, key, scope = await setup()
    status, headers, first = await _post(gw, key, _chat(Q1))
    assert (status, headers["x-tollway-cache"]) == (200, "miss")
    await _rows(pg, scope, 1)
    status, headers, second = await _post(gw, key, _chat(Q2))
    assert (status, headers["x-tollway-cache"]) == (200, "semantic-hit")
    assert 0.87 <= float(headers["x-tollway-cache-similarity"]) < 1.0
    assert _content(second) == _content(first) == Q1  # the stored answer, not a new one
    hit = [r for r in gw.settler.records if r.cached]
    assert len(hit) == 1 and hit[0].cache == "semantic-hit" and hit[0].usage.total_tokens == 0
    # The usage rows: the hit (cached, no tokens, the similarity in details),
    # and one embedding call per request, named after the tenant.
    row = await wait_for(
        pg,
        "SELECT details->>'cache' FROM usage_events WHERE request_id = $1 AND cached",
        hit[0].request_id,
        expect="semantic",
    )
    assert row == "semantic"
    got = await pg.fetchrow(
        "SELECT prompt_tokens, completion_tokens, (details->>'similarity')::float AS s "
        "FROM usage_events WHERE request_id = $1 AND cached",
        hit[0].request_id,
    )
    assert (got["prompt_tokens"], got["completion_tokens"]) == (0, 0) and got["s"] >= 0.87
    await wait_for(
        pg,
        "SELECT count(*) FROM usage_events e JOIN tenants t ON t.id = e.tenant_id "
        "WHERE 't' || t.id = $1 AND e.endpoint = 'embeddings' AND e.tags->>'tollway' = "
        "'semantic-cache' AND e.status = 200",
        scope,
        expect=2,
    )


async def test_hits_are_counted_on_the_row(setup: Any, pg: asyncpg.Pool) -> None:
    """Counted in memory and written by the sweeper's tick: the eviction's
    least-recently-used order reads them."""
    gw, key, scope = await setup()
    await _post(gw, key, _chat(Q1))
    await _rows(pg, scope, 1)
    for _ in range(3):
        assert (await _post(gw, key, _chat(Q2)))[1]["x-tollway-cache"] == "semantic-hit"
    query = "SELECT hits FROM semantic_cache WHERE scope = $1 AND last_hit_at IS NOT NULL"
    assert await wait_for(pg, query, scope, expect=3, limit=15) == 3


async def test_hit_billing_tokens_bills_the_original_tokens(setup: Any, pg: asyncpg.Pool) -> None:
    gw, key, scope = await setup(hit_billing="tokens")
    await _post(gw, key, _chat(Q1))
    await _rows(pg, scope, 1)
    assert (await _post(gw, key, _chat(Q2)))[1]["x-tollway-cache"] == "semantic-hit"
    miss, hit = [r for r in gw.settler.records if r.endpoint == "chat"]
    assert hit.usage.total_tokens == miss.usage.total_tokens > 0


async def test_what_differs_besides_the_last_message_is_a_miss(
    setup: Any, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    gw, key, scope = await setup()
    system = {"role": "system", "content": "You are terse."}
    earlier = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    await _post(gw, key, _chat(Q1, system, *earlier, tools=tools))
    await _rows(pg, scope, 1)
    same = await _post(gw, key, _chat(Q2, system, *earlier, tools=tools))
    assert same[1]["x-tollway-cache"] == "semantic-hit"
    other_system = {"role": "system", "content": "You are verbose."}
    variants = [
        _chat(Q2, other_system, *earlier, tools=tools),
        _chat(Q2, system, earlier[0], {"role": "assistant", "content": "Hello"}, tools=tools),
        _chat(Q2, system, *earlier, tools=[{**tools[0], "function": {"name": "g"}}]),
        _chat(Q2, system, *earlier),
        _chat(Q2, system, *earlier, tools=tools, response_format={"type": "json_object"}),
    ]
    for body in variants:
        status, headers, raw = await _post(gw, key, body)
        assert (status, headers["x-tollway-cache"]) == (200, "miss"), body
        assert _content(raw) == Q2
    # Another tenant never sees this one's entries.
    _, other = await tenant_with_key(pg, tmp_path, "pro")
    status, headers, _ = await _post(gw, other["api_key"], _chat(Q2, system, *earlier, tools=tools))
    assert (status, headers["x-tollway-cache"]) == (200, "miss")


async def test_bypasses(setup: Any, pg: asyncpg.Pool) -> None:
    gw, key, scope = await setup()
    await _post(gw, key, _chat(Q1))
    await _rows(pg, scope, 1)
    for body, hdr in [
        (_chat(Q2, temperature=0.7), {}),
        (_chat(Q2, n=2), {}),
        (_chat(Q2), {"x-tollway-cache": "no-store"}),
        (
            {
                "model": "echo",
                "messages": [
                    {"role": "user", "content": Q1},
                    {"role": "assistant", "tool_calls": [_call()]},
                    {"role": "tool", "tool_call_id": "c1", "content": "Paris"},
                ],
            },
            {},
        ),
    ]:
        status, headers, _ = await _post(gw, key, body, **hdr)
        assert (status, headers["x-tollway-cache"]) == (200, "bypass"), body
    assert (await _post(gw, key, _chat(Q2)))[1]["x-tollway-cache"] == "semantic-hit"
    await _rows(pg, scope, 1)  # nothing bypassed was stored


def _call() -> dict[str, Any]:
    return {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


async def test_an_expired_entry_misses_and_is_swept(setup: Any, pg: asyncpg.Pool) -> None:
    gw, key, scope = await setup(ttl_s=0.5)
    await _post(gw, key, _chat(Q1))
    await _rows(pg, scope, 1)
    await _rows(pg, scope, 0, live=True)  # its TTL ran out
    assert (await _post(gw, key, _chat(Q2)))[1]["x-tollway-cache"] == "miss"
    store = _stage(gw).store
    assert store is not None
    await _rows(pg, scope, 2)
    await _rows(pg, scope, 0, live=True)
    expired, _ = await store.sweep(max_per_scope=1000)
    assert expired >= 2
    await _rows(pg, scope, 0)


async def test_the_cap_evicts_the_least_recently_used(setup: Any, pg: asyncpg.Pool) -> None:
    gw, key, scope = await setup()
    questions = ["How do I bake bread?", "Why is the sky blue?", Q1]
    for i, q in enumerate(questions):
        await _post(gw, key, _chat(q))
        await _rows(pg, scope, i + 1)
    store = _stage(gw).store
    assert store is not None
    _, evicted = await store.sweep(max_per_scope=2)  # every tenant's: other tests' too
    assert evicted >= 1
    await _rows(pg, scope, 2)
    assert (await _post(gw, key, _chat("How do I bake bread")))[1]["x-tollway-cache"] == "miss"
    assert (await _post(gw, key, _chat(Q2)))[1]["x-tollway-cache"] == "semantic-hit"


async def test_the_sweeper_follows_the_reloaded_cap_and_interval(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    """No request after the reload: the sweeper reads the live config itself."""
    config_file = tmp_path / "tollway.yaml"
    hourly = _config(fake_openai.url, sweep_interval_s=3600, max_entries_per_tenant=1)
    gw = await start_gateway(
        hourly, database_url=pg_url, data_dir=tmp_path, config_file=config_file
    )
    tenant, key = await tenant_with_key(pg, tmp_path, "pro")
    scope = f"t{await pg.fetchval('SELECT id FROM tenants WHERE name = $1', tenant)}"
    for i, q in enumerate(["How do I bake bread?", Q1]):
        await _post(gw, key["api_key"], _chat(q))
        await _rows(pg, scope, i + 1)  # over the cap of 1: no sweep for an hour
    often = _config(fake_openai.url, sweep_interval_s=0.2, max_entries_per_tenant=1)
    write_atomically(config_file, often)
    query = "SELECT count(*) FROM semantic_cache WHERE scope = $1"
    await wait_for(pg, query, scope, expect=1, limit=15)  # the reload, then a sweep


class SlowEmbeddings:
    """An OpenAI-compatible server whose embeddings never answer in time."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.url = ""
        self.runner: web.AppRunner | None = None

    async def start(self) -> SlowEmbeddings:
        app = web.Application()
        app.router.add_post("/v1/embeddings", self._hang)
        self.runner, url = await serve_app(app, handler_cancellation=True)
        self.url = url + "/v1"
        return self

    async def _hang(self, request: web.Request) -> web.Response:
        await self.release.wait()
        return web.json_response({})


@pytest.fixture
async def slow() -> AsyncIterator[SlowEmbeddings]:
    server = await SlowEmbeddings().start()
    yield server
    server.release.set()
    assert server.runner is not None
    await server.runner.cleanup()


@pytest.mark.parametrize("where", ["down", "slow"])
async def test_a_failing_embedding_provider_is_a_miss(
    where: str,
    slow: SlowEmbeddings,
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg_url: str,
    pg: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    url = slow.url if where == "slow" else "http://127.0.0.1:9/v1"  # discard port: refused
    cfg = _config(fake_openai.url, embedding_model="embedder", embedding_timeout_s=0.3)
    cfg["providers"]["emb"] = {"kind": "openai", "base_url": url, "api_key": "sk-x"}
    cfg["models"].append({"name": "embedder", "targets": [{"provider": "emb"}]})
    gw = await start_gateway(cfg, database_url=pg_url, data_dir=tmp_path)
    _, key = await tenant_with_key(pg, tmp_path, "pro")
    for _ in range(2):
        status, headers, raw = await _post(gw, key["api_key"], _chat(Q1))
        assert (status, headers["x-tollway-cache"]) == (200, "miss")
        assert _content(raw) == Q1
    embeds = [r for r in gw.settler.records if r.endpoint == "embeddings"]
    assert len(embeds) == 2 and all(r.status >= 500 for r in embeds)


async def test_a_stream_hit_replays_valid_sse(setup: Any, pg: asyncpg.Pool) -> None:
    gw, key, scope = await setup()
    opts = {"stream": True, "stream_options": {"include_usage": True}}
    status, headers, _ = await _post(gw, key, _chat(Q1, **opts))
    assert (status, headers["x-tollway-cache"]) == (200, "miss")
    await _rows(pg, scope, 1)  # the stream, assembled
    status, headers, raw = await _post(gw, key, _chat(Q2, **opts))
    assert (status, headers["x-tollway-cache"]) == (200, "semantic-hit")
    assert headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    chunks = [orjson.loads(event_data(e + b"\n\n") or b"") for e in events[:-1]]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == Q1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


def test_config_errors_name_the_key() -> None:
    base = _config("http://127.0.0.1:1/v1")
    for bad, where in [
        ({"enabled": True, "embedding_model": "echo", "treshold": 0.9}, "semantic_cache.treshold"),
        ({"enabled": True, "embedding_model": "nope"}, "semantic_cache.embedding_model"),
        ({"enabled": True}, "semantic_cache.embedding_model"),
        (
            {"enabled": True, "embedding_model": "echo", "threshold": 1.5},
            "semantic_cache.threshold",
        ),
        (
            {"enabled": True, "embedding_model": "echo", "models": {"e*": {"ttl": 1}}},
            "semantic_cache.models.e*.ttl",
        ),
    ]:
        with pytest.raises(ConfigError, match=rf"^{where.replace('*', '[*]')}:"):
            parse_config(yaml.safe_dump({**base, "semantic_cache": bad}), {})


async def test_purge_by_admin_route_and_cli(
    setup: Any, pg: asyncpg.Pool, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOLLWAY_ADMIN_KEY", "tw-admin-semantic-test")
    gw, key, scope = await setup()
    await _post(gw, key, _chat(Q1))
    await _rows(pg, scope, 1)
    tenant = await pg.fetchval("SELECT name FROM tenants WHERE 't' || id = $1", scope)
    headers = {"Authorization": "Bearer tw-admin-semantic-test"}
    async with aiohttp.ClientSession() as s:
        body = {"tenant": tenant, "model": "other-model"}
        async with s.post(gw.url + "/admin/cache/purge", json=body, headers=headers) as r:
            assert (r.status, (await r.json())["deleted"]) == (200, 0)
        async with s.post(
            gw.url + "/admin/cache/purge", json={"tenant": tenant}, headers=headers
        ) as r:
            assert (r.status, (await r.json())["deleted"]) == (200, 1)
        async with s.post(
            gw.url + "/admin/cache/purge", json={"tenant": "nobody-x"}, headers=headers
        ) as r:
            assert r.status == 404
    assert (await _post(gw, key, _chat(Q2)))[1]["x-tollway-cache"] == "miss"
    await _rows(pg, scope, 1)  # Q2's answer, stored
    out = _tollway(
        "cache", "purge", "--tenant", tenant, "--model", "echo", env=_env(pg_url, tmp_path)
    )
    assert out.returncode == 0, out.stderr
    assert "deleted=1" in out.stdout
    await _rows(pg, scope, 0)


async def test_metrics_count_hits_misses_and_bypasses(setup: Any, pg: asyncpg.Pool) -> None:
    gw, key, scope = await setup()
    await _post(gw, key, _chat(Q1))
    await _rows(pg, scope, 1)
    await _post(gw, key, _chat(Q2))
    await _post(gw, key, _chat(Q2, n=2))
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/metrics") as r:
        text = await r.text()
    for result in ("hit", "miss", "bypass"):
        assert f'tollway_semantic_cache_requests_total{{result="{result}"}} 1' in text
    assert "tollway_semantic_cache_similarity_count 1" in text  # Q1's miss found no neighbour
    assert "tollway_semantic_cache_embedding_seconds_count 2" in text
