"""Moderation: the guardrails' moderation check and ``POST /v1/moderations``,
through the official SDK against a fake provider that records what it
receives (and which requests the gateway cancelled)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from aiohttp import web

from proxy.config.reader import ConfigError
from proxy.pipeline.registry import parse_config
from proxy.providers.moderation import CATEGORIES, result
from tests.billing_helpers import billing_config, tenant_with_key, wait_for
from tests.conftest import StartGateway, gateway_config
from tests.guardrail_helpers import start_guarded
from tests.loopback import serve_app
from tests.schema import validate
from tests.waiting import until

FLAGGED = "how do I make it go kaboom"
CLEAN = "what is the capital of France"


@dataclass
class ModerationProvider:
    """OpenAI-compatible chat and moderations. By the model name (the
    gateway's ``fake-*`` glob passes it through): moderation ``slow`` never
    answers, ``fail`` answers 500, ``late`` answers only once a chat request
    has arrived, anything else flags ``violence`` in a text with "kaboom";
    chat ``slow`` answers only after ``release`` (a stream after its first
    chunk). A request the gateway gave up on lands in ``cancelled``."""

    moderated: list[dict[str, Any]] = field(default_factory=list)
    chats: list[dict[str, Any]] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    chat_seen: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    runner: web.AppRunner | None = None

    async def start(self) -> ModerationProvider:
        app = web.Application()
        app.router.add_post("/v1/moderations", self._moderations)
        app.router.add_post("/v1/chat/completions", self._chat)
        # A client that goes away cancels the handler: that is what we record.
        self.runner, url = await serve_app(app, handler_cancellation=True)
        self.url = url + "/v1"
        return self

    async def _moderations(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.moderated.append(body)
        model = str(body["model"]).removeprefix("fake-")
        if model == "mod-slow":
            await asyncio.sleep(60)  # the behaviour: a moderation model that never answers
        if model == "mod-fail":
            err = {"message": "boom", "type": "server_error", "param": None, "code": None}
            return web.json_response({"error": err}, status=500)
        if model == "mod-late":
            async with asyncio.timeout(10):
                await self.chat_seen.wait()
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        results = [result({"violence": 0.91} if "kaboom" in t else {}) for t in texts]
        return web.json_response({"id": "modr-1", "model": model, "results": results})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.chats.append(body)
        self.chat_seen.set()
        stream = bool(body.get("stream"))
        try:
            if stream:
                return await self._stream(request, body)
            if body["model"] == "fake-slow":
                await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append("stream" if stream else "reply")
            raise
        msg = {"role": "assistant", "content": "Paris."}
        return web.json_response(
            {
                "id": "c1",
                "object": "chat.completion",
                "created": 1,
                "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": msg}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
            }
        )

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":'
        await resp.write(b"data: " + base + b'[{"index":0,"delta":{"content":"Par"}}]}\n\n')
        if body["model"] == "fake-slow":
            await self.release.wait()
        await resp.write(b"data: " + base + b'[{"index":0,"delta":{"content":"is."}}]}\n\n')
        await resp.write(b"data: " + base + b'[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def provider() -> AsyncIterator[ModerationProvider]:
    fake = await ModerationProvider().start()
    yield fake
    fake.release.set()
    assert fake.runner is not None
    await fake.runner.cleanup()


def moderation(model: str = "fake-mod", **cfg: Any) -> dict[str, Any]:
    entry = {"name": "safety", "moderation": {"model": model, **cfg}, "input": "block"}
    return {"policies": [{"name": "p", "detectors": [entry]}]}


async def ask(gw: Any, text: str, model: str = "fake-m", **kw: Any) -> Any:
    return await gw.sdk().chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], **kw
    )


def rows(gw: Any, endpoint: str) -> list[Any]:
    return [r for r in gw.settler.records if r.endpoint == endpoint]


# ------------------------------------------------------------------ before


async def test_a_flagged_prompt_is_a_400_naming_the_category_and_never_forwarded(
    start_gateway: StartGateway, provider: ModerationProvider
) -> None:
    gw = await start_guarded(start_gateway, provider.url, moderation())
    with pytest.raises(openai.BadRequestError) as info:
        await ask(gw, FLAGGED)
    err = info.value.body
    assert isinstance(err, dict) and err["code"] == "content_filter"
    assert "'safety'" in err["message"] and "violence" in err["message"]
    assert "kaboom" not in err["message"]
    assert provider.chats == []
    assert provider.moderated[-1]["input"] == [FLAGGED]
    verdicts = rows(gw, "chat")[-1].extra["guardrails"]
    assert {"guardrail": "safety", "detector": "moderation", "category": "violence",
            "action": "block", "direction": "input", "count": 1} in verdicts  # fmt: skip

    reply = await ask(gw, CLEAN)
    assert reply.choices[0].message.content == "Paris."
    # Each moderation call is its own usage row, tagged, named after the caller.
    mod_rows = rows(gw, "moderations")
    assert len(mod_rows) == 2 and all(r.tags == {"tollway": "guardrails"} for r in mod_rows)
    assert all(r.status == 200 and r.usage.prompt_tokens > 0 for r in mod_rows)


async def test_thresholds_per_category_decide_what_is_flagged(
    start_gateway: StartGateway, provider: ModerationProvider
) -> None:
    gw = await start_guarded(start_gateway, provider.url, moderation(thresholds={"violence": 0.95}))
    reply = await ask(gw, FLAGGED)  # 0.91 < 0.95
    assert reply.choices[0].message.content == "Paris."


@pytest.mark.parametrize("model", ["fake-mod-slow", "fake-mod-fail"])
async def test_fail_open_lets_the_request_through_when_moderation_cannot_answer(
    start_gateway: StartGateway, provider: ModerationProvider, model: str
) -> None:
    gw = await start_guarded(
        start_gateway, provider.url, moderation(model, fail="open", timeout_s=0.5)
    )
    reply = await ask(gw, FLAGGED)
    assert reply.choices[0].message.content == "Paris."
    verdicts = rows(gw, "chat")[-1].extra["guardrails"]
    assert verdicts[0]["category"] == "unavailable" and verdicts[0]["action"] == "fail_open"
    assert rows(gw, "moderations")[-1].status >= 500


@pytest.mark.parametrize(
    ("model", "limit", "why"),
    [("fake-mod-slow", 0.5, "timed out"), ("fake-mod-fail", 10, "failed (")],
)
async def test_fail_closed_refuses_the_request_with_a_clear_503(
    start_gateway: StartGateway, provider: ModerationProvider, model: str, limit: float, why: str
) -> None:
    """The failing model's 500s are retried as any provider's are, within the timeout."""
    guard = moderation(model, fail="closed", timeout_s=limit)
    gw = await start_guarded(start_gateway, provider.url, guard)
    with pytest.raises(openai.InternalServerError) as info:
        await ask(gw, CLEAN)
    assert info.value.status_code == 503
    err = info.value.body
    assert isinstance(err, dict) and err["code"] == "guardrail_unavailable"
    assert err["type"] == "server_error"
    assert (
        "'safety'" in err["message"] and why in err["message"] and "fail-closed" in err["message"]
    )
    assert provider.chats == []


# ------------------------------------------------------------------ parallel


@pytest.mark.parametrize("stream", [False, True])
async def test_parallel_cancels_the_upstream_on_a_block(
    start_gateway: StartGateway, provider: ModerationProvider, stream: bool
) -> None:
    """The moderation model answers only once the chat request has reached
    the provider (both are in flight at once); the block then cancels it."""
    gw = await start_guarded(
        start_gateway, provider.url, moderation("fake-mod-late", mode="parallel")
    )
    with pytest.raises(openai.BadRequestError) as info:
        await ask(gw, FLAGGED, model="fake-slow", stream=stream)
    assert info.value.body["code"] == "content_filter"  # type: ignore[index]
    assert len(provider.chats) == 1
    await until(lambda: provider.cancelled == ["stream" if stream else "reply"])
    assert rows(gw, "chat")[-1].status == 400


@pytest.mark.parametrize("stream", [False, True])
async def test_parallel_holds_the_answer_until_a_passing_verdict(
    start_gateway: StartGateway, provider: ModerationProvider, stream: bool
) -> None:
    gw = await start_guarded(
        start_gateway, provider.url, moderation("fake-mod-late", mode="parallel")
    )
    if stream:
        chunks = await ask(gw, CLEAN, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    else:
        text = (await ask(gw, CLEAN)).choices[0].message.content
    assert text == "Paris."
    assert len(provider.moderated) == 1 and provider.cancelled == []


async def test_parallel_fail_closed_refuses_even_when_the_answer_came_first(
    start_gateway: StartGateway, provider: ModerationProvider
) -> None:
    guard = moderation("fake-mod-slow", mode="parallel", fail="closed", timeout_s=0.5)
    gw = await start_guarded(start_gateway, provider.url, guard)
    with pytest.raises(openai.InternalServerError) as info:
        await ask(gw, CLEAN)
    assert info.value.body["code"] == "guardrail_unavailable"  # type: ignore[index]
    assert len(provider.chats) == 1  # it answered; its answer was held, then refused


# ------------------------------------------------------------------ /v1/moderations


async def test_the_moderations_endpoint_is_routed_billed_and_shaped_like_openai(
    start_gateway: StartGateway, provider: ModerationProvider
) -> None:
    cfg = gateway_config(provider.url)
    cfg["models"].append({"name": "omni-moderation-latest", "targets": [{"provider": "echo"}]})
    gw = await start_gateway(cfg)
    answer = await gw.sdk().moderations.create(input=["fine words", "kaboom now"])
    assert [r.flagged for r in answer.results] == [False, True]
    assert answer.results[1].categories.violence is True
    async with aiohttp.ClientSession() as http:
        body = {"model": "fake-mod", "input": [{"type": "text", "text": "kaboom"}]}
        async with http.post(f"{gw.url}/v1/moderations", json=body) as resp:
            assert resp.status == 200
            raw = await resp.json()
    validate(raw, "CreateModerationResponse")
    assert set(raw["results"][0]["category_scores"]) == set(CATEGORIES)
    assert provider.moderated[-1]["model"] == "fake-mod"
    billed = rows(gw, "moderations")
    assert [r.public_model for r in billed] == ["omni-moderation-latest", "fake-mod"]
    assert all(r.status == 200 and r.usage.prompt_tokens > 0 for r in billed)
    assert billed[0].provider == "echo" and billed[1].provider == "fake"


async def test_the_moderations_endpoint_checks_its_input(start_gateway: StartGateway) -> None:
    gw = await start_gateway(gateway_config("http://127.0.0.1:9"))
    with pytest.raises(openai.BadRequestError) as info:
        await gw.sdk().moderations.create(input=[], model="echo")
    assert info.value.body["param"] == "input"  # type: ignore[index]


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ({"moderation": {}, "output": "redact"}, "detectors[0].output: moderation's action must"),
        ({"moderation": {}}, "detectors[0]: input/output: give moderation an action"),
        ({"moderation": {"thresholds": {"violense": 0.5}}, "input": "block"}, "violense"),
        ({"moderation": {"thresholds": {"hate": 2}}, "input": "block"}, "between 0 and 1"),
        ({"moderation": {"mode": "after"}, "input": "block"}, "mode: must be one of"),
        ({"moderation": {"fail": "maybe"}, "input": "log"}, "fail: must be 'open' or 'closed'"),
        ({"moderation": {}, "input": "redact"}, "'block', 'log' or 'off'"),
    ],
)
def test_the_moderation_section_is_strict(entry: dict[str, Any], error: str) -> None:
    section = {"policies": [{"name": "p", "detectors": [entry]}]}
    with pytest.raises(ConfigError, match=re.escape(error)):
        parse_config(yaml.safe_dump(gateway_config("http://127.0.0.1:9", guardrails=section)))


# ------------------------------------------------------------------ billing (Postgres)


async def test_moderation_rows_are_billed_to_the_tenant_in_postgres(
    start_gateway: StartGateway,
    provider: ModerationProvider,
    pg_url: str,
    pg: Any,
    tmp_path: Any,
) -> None:
    """Both the client's ``/v1/moderations`` request and the guardrail's own
    moderation call land in ``usage_events`` under the caller's tenant."""
    cfg = {**billing_config(provider.url), "guardrails": moderation()}
    gw = await start_gateway(cfg, database_url=pg_url, data_dir=tmp_path)
    tenant, key = await tenant_with_key(pg, tmp_path, "pro")
    client = gw.sdk(api_key=key["api_key"])
    answer = await client.moderations.create(model="fake-mod", input="kaboom")
    assert answer.results[0].flagged
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model="fake-m", messages=[{"role": "user", "content": FLAGGED}]
        )
    query = (
        "SELECT count(*) FROM usage_events e JOIN tenants t ON t.id = e.tenant_id"
        " WHERE t.name = $1 AND e.endpoint = 'moderations' AND e.status = 200"
        " AND e.prompt_tokens > 0"
    )
    await wait_for(pg, query, tenant, expect=2)
    tagged = await pg.fetchval(
        "SELECT count(*) FROM usage_events e JOIN tenants t ON t.id = e.tenant_id"
        " WHERE t.name = $1 AND e.tags->>'tollway' = 'guardrails'",
        tenant,
    )
    assert tagged == 1
