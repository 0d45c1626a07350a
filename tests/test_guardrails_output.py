"""Output guardrails beyond the answer's text: tool-call arguments (streamed
and whole), through the official SDK against a fake provider that answers
with a tool call."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import StartGateway
from tests.guardrail_helpers import start_guarded
from tests.loopback import serve_app
from tests.test_guardrails import SECRET, policy, splits, sse_events

ARGS = '{"key": "' + SECRET + '", "city": "Paris"}'
CHAT = {"model": "fake-m", "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class ToolCallProvider:
    """Answers every chat request with one tool call whose arguments are
    ``arguments``, streamed in the ``pieces`` it is given (each its own
    event, the first one carrying the call's id and name, as OpenAI sends)."""

    arguments: str = ARGS
    pieces: list[str] = field(default_factory=list)
    url: str = ""
    runner: web.AppRunner | None = None

    async def start(self) -> ToolCallProvider:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self.runner, url = await serve_app(app)
        self.url = url + "/v1"
        return self

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        call = {"id": "call_1", "type": "function", "function": {"name": "lookup"}}
        if not body.get("stream"):
            call["function"]["arguments"] = self.arguments
            msg = {"role": "assistant", "content": None, "tool_calls": [call]}
            choice = {"index": 0, "finish_reason": "tool_calls", "message": msg}
            usage = {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
            return web.json_response(
                {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(delta: dict[str, Any], finish: str | None = None) -> None:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            await resp.write(b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n")

        call["function"]["arguments"] = ""
        await send({"role": "assistant", "content": None, "tool_calls": [{"index": 0, **call}]})
        for piece in self.pieces or [self.arguments]:
            await send({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        await send({}, "tool_calls")
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def tools() -> AsyncIterator[ToolCallProvider]:
    fake = await ToolCallProvider().start()
    yield fake
    assert fake.runner is not None
    await fake.runner.cleanup()


async def test_a_secret_in_tool_call_arguments_is_redacted_in_a_whole_reply(
    start_gateway: StartGateway, tools: ToolCallProvider
) -> None:
    gw = await start_guarded(start_gateway, tools.url, policy())
    reply = await gw.sdk().chat.completions.create(**CHAT)
    calls = reply.choices[0].message.tool_calls
    assert calls is not None and calls[0].function.name == "lookup"
    assert calls[0].function.arguments == '{"key": "[API_KEY_1]", "city": "Paris"}'


async def test_a_secret_split_across_tool_call_argument_deltas_never_reaches_the_client(
    start_gateway: StartGateway, tools: ToolCallProvider
) -> None:
    gw = await start_guarded(start_gateway, tools.url, policy())
    client = gw.sdk()
    for pieces in splits(ARGS)[::2]:
        tools.pieces = pieces
        stream = await client.chat.completions.create(**CHAT, stream=True)
        got: list[str] = []
        names, finishes = [], []
        async for chunk in stream:
            for choice in chunk.choices:
                finishes.append(choice.finish_reason)
                for call in choice.delta.tool_calls or ():
                    assert call.index == 0
                    if call.function is not None:
                        names.append(call.function.name)
                        got.append(call.function.arguments or "")
        assert "".join(got) == '{"key": "[API_KEY_1]", "city": "Paris"}', pieces
        assert not any(SECRET[:12] in g for g in got), pieces
        assert "lookup" in names and finishes[-1] == "tool_calls"


async def test_a_blocked_term_in_streamed_arguments_ends_with_content_filter(
    start_gateway: StartGateway, tools: ToolCallProvider
) -> None:
    gw = await start_guarded(start_gateway, tools.url, policy())
    tools.arguments = '{"plan": "the zorblax plan", "when": "now"}'
    for pieces in splits(tools.arguments)[::5]:
        tools.pieces = pieces
        events = await sse_events(gw.base_url + "/chat/completions", {**CHAT, "stream": True})
        chunks = [e for e in events if isinstance(e, dict) and "choices" in e]
        args = "".join(
            (call.get("function") or {}).get("arguments") or ""
            for c in chunks
            for call in c["choices"][0].get("delta", {}).get("tool_calls") or ()
        )
        assert "zorblax" not in args and tools.arguments.startswith(args), pieces
        assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
        assert events[-1]["error"]["code"] == "content_filter"
