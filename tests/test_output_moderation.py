"""Output moderation: the model's answer (whole and streamed) moderated
through the gateway's own providers, with ``before`` and ``parallel``
semantics, through the official SDK against fakes that record what they get."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
from aiohttp import web

from proxy.providers.moderation import result
from proxy.stages.guardrails.moderation import SEGMENT
from tests.conftest import StartGateway
from tests.guardrail_helpers import start_guarded, text_reply
from tests.loopback import serve_app
from tests.test_guardrails import sse_events

EMAIL = "jane.doe@example.com"
FLAGGED = "Step two: make it go kaboom."


@dataclass
class AnswerProvider:
    """Chat answers ``answer`` (streamed in ``pieces`` when given, else in
    pieces of 7 characters); moderation flags ``violence`` in any text with
    "kaboom" and records what it was asked; moderation model ``mod-slow``
    never answers."""

    answer: str = "Paris."
    pieces: list[str] = field(default_factory=list)
    moderated: list[list[str]] = field(default_factory=list)
    url: str = ""
    runner: web.AppRunner | None = None

    async def start(self) -> AnswerProvider:
        app = web.Application()
        app.router.add_post("/v1/moderations", self._moderations)
        app.router.add_post("/v1/chat/completions", self._chat)
        self.runner, url = await serve_app(app, handler_cancellation=True)
        self.url = url + "/v1"
        return self

    async def _moderations(self, request: web.Request) -> web.Response:
        body = await request.json()
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        self.moderated.append(texts)
        if body["model"] == "fake-mod-slow":
            await asyncio.sleep(60)  # the behaviour: a moderation model that never answers
        results = [result({"violence": 0.91} if "kaboom" in t else {}) for t in texts]
        return web.json_response({"id": "modr-1", "model": body["model"], "results": results})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        text = self.answer
        pieces = self.pieces or [text[i : i + 7] for i in range(0, len(text), 7)]
        return await text_reply(request, body, text, pieces)


@pytest.fixture
async def provider() -> AsyncIterator[AnswerProvider]:
    fake = await AnswerProvider().start()
    yield fake
    assert fake.runner is not None
    await fake.runner.cleanup()


def policy(mode: str = "before", model: str = "fake-mod", **cfg: Any) -> dict[str, Any]:
    safety = {
        "name": "safety",
        "moderation": {"model": model, "mode": mode, **cfg},
        "output": "block",
    }
    pii = {"use": "pii", "input": "redact"}
    return {"policies": [{"name": "p", "restore": True, "detectors": [pii, safety]}]}


def chat(text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "fake-m", "messages": [{"role": "user", "content": text}], **extra}


def streamed_text(events: list[Any]) -> str:
    chunks = [e for e in events if isinstance(e, dict) and "choices" in e]
    return "".join(c["choices"][0].get("delta", {}).get("content") or "" for c in chunks)


@pytest.mark.parametrize("mode", ["before", "parallel"])
async def test_a_flagged_whole_answer_is_a_400_and_a_clean_one_passes(
    start_gateway: StartGateway, provider: AnswerProvider, mode: str
) -> None:
    gw = await start_guarded(start_gateway, provider.url, policy(mode))
    provider.answer = FLAGGED
    with pytest.raises(openai.BadRequestError) as info:
        await gw.sdk().chat.completions.create(**chat())
    err = info.value.body
    assert isinstance(err, dict) and err["code"] == "content_filter"
    assert "model's answer" in err["message"] and "'safety'" in err["message"]
    assert "violence" in err["message"] and "kaboom" not in err["message"]
    assert provider.moderated[-1] == [FLAGGED]
    chat_rows = [r for r in gw.settler.records if r.endpoint == "chat"]
    # The provider answered (and bills it): the refused answer is billed too.
    assert chat_rows[-1].usage.completion_tokens == 5
    verdicts = gw.settler.records[-1].extra["guardrails"]
    assert {"guardrail": "safety", "detector": "moderation", "category": "violence",
            "action": "block", "direction": "output", "count": 1} in verdicts  # fmt: skip

    provider.answer = "Paris."
    reply = await gw.sdk().chat.completions.create(**chat())
    assert reply.choices[0].message.content == "Paris."


async def test_moderation_reads_the_answer_before_restore(
    start_gateway: StartGateway, provider: AnswerProvider
) -> None:
    gw = await start_guarded(start_gateway, provider.url, policy())
    provider.answer = "Write to [EMAIL_1] today."  # the model saw only the placeholder
    reply = await gw.sdk().chat.completions.create(**chat(f"my mail is {EMAIL}"))
    assert reply.choices[0].message.content == f"Write to {EMAIL} today."
    assert provider.moderated[-1] == ["Write to [EMAIL_1] today."]
    stream = await gw.sdk().chat.completions.create(**chat(f"my mail is {EMAIL}"), stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == f"Write to {EMAIL} today."
    assert all(EMAIL not in t for texts in provider.moderated for t in texts)


async def test_before_sends_no_byte_of_a_flagged_segment(
    start_gateway: StartGateway, provider: AnswerProvider
) -> None:
    gw = await start_guarded(start_gateway, provider.url, policy("before"))
    clean = "All calm here. " * (SEGMENT // 15 + 1)  # one whole clean segment first
    provider.answer = clean + FLAGGED
    events = await sse_events(gw.base_url + "/chat/completions", chat(stream=True))
    text = streamed_text(events)
    assert "kaboom" not in text and "Step two" not in text
    assert clean.startswith(text) and len(text) >= SEGMENT
    finishes = [c["choices"][0].get("finish_reason") for c in events if isinstance(c, dict)
                and c.get("choices")]  # fmt: skip
    assert finishes[-1] == "content_filter"
    assert events[-1]["error"]["code"] == "content_filter"
    assert len(provider.moderated) == 2  # the clean segment, then the rest at the end

    provider.answer = "Paris is calm."
    stream = await gw.sdk().chat.completions.create(**chat(), stream=True)
    got = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(got) == "Paris is calm."


async def test_parallel_sends_at_once_and_ends_a_flagged_stream_with_content_filter(
    start_gateway: StartGateway, provider: AnswerProvider
) -> None:
    gw = await start_guarded(start_gateway, provider.url, policy("parallel"))
    provider.answer = FLAGGED
    events = await sse_events(gw.base_url + "/chat/completions", chat(stream=True))
    chunks = [e for e in events if isinstance(e, dict) and "choices" in e]
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert all(c["choices"][0].get("finish_reason") != "stop" for c in chunks)
    assert events[-1]["error"]["code"] == "content_filter"
    assert "[DONE]" not in events
    with pytest.raises(openai.APIError):
        stream = await gw.sdk().chat.completions.create(**chat(), stream=True)
        async for _ in stream:
            pass

    provider.answer = "Paris is calm."
    stream = await gw.sdk().chat.completions.create(**chat(), stream=True)
    got = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(got) == "Paris is calm."


@pytest.mark.parametrize("mode", ["before", "parallel"])
async def test_fail_closed_ends_a_stream_whose_answer_could_not_be_checked(
    start_gateway: StartGateway, provider: AnswerProvider, mode: str
) -> None:
    cfg = policy(mode, "fake-mod-slow", timeout_s=0.3, fail="closed")
    gw = await start_guarded(start_gateway, provider.url, cfg)
    events = await sse_events(gw.base_url + "/chat/completions", chat(stream=True))
    assert events[-1]["error"]["code"] == "guardrail_unavailable"
    assert all(c["choices"][0].get("finish_reason") != "stop" for c in events
               if isinstance(c, dict) and c.get("choices"))  # fmt: skip
    open_cfg = policy(mode, "fake-mod-slow", timeout_s=0.3, fail="open")
    gw = await start_guarded(start_gateway, provider.url, open_cfg)
    stream = await gw.sdk().chat.completions.create(**chat(), stream=True)
    got = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(got) == "Paris."
