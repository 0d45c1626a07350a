"""Anthropic's Messages API as a front door, end to end through the official
``anthropic`` SDK, against the echo provider and fake OpenAI, Anthropic and
Gemini servers; the stream translator alone; Anthropic-shaped errors."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import asyncpg
import orjson
import pytest
from anthropic.types import RawMessageStreamEvent
from pydantic import TypeAdapter

from proxy.core.errors import ProviderHTTPError, UpstreamStreamBroken
from proxy.core.sse import data_event
from proxy.doors.messages import MessagesDoor
from proxy.doors.messages_request import to_chat
from proxy.doors.messages_stream import MessagesStream
from tests.billing_helpers import USAGE_COUNT, USAGE_ROWS, billing_config, wait_for
from tests.conftest import Gateway, StartGateway, StartKeyed, all_providers_config
from tests.fakes import FAKE_USAGE, WORDS, FakeOpenAI
from tests.fakes_providers import FakeAnthropic, FakeGemini
from tests.waiting import until

HELLO = [{"role": "user", "content": "Say hello"}]
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a place.",
    "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}},
}
PNG = (  # a 1x1 image
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
_EVENT = TypeAdapter(RawMessageStreamEvent)
README = Path(__file__).resolve().parents[1] / "README.md"


def check_event(data: dict[str, Any]) -> None:
    """As the SDK reads it (its union leaves out ``ping``, which it skips)."""
    if data["type"] != "ping":
        _EVENT.validate_python(data)


@pytest.fixture
async def gw(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    fake_gemini: FakeGemini,
) -> Gateway:
    cfg = all_providers_config(fake_openai.url, fake_anthropic.url, fake_gemini.url)
    # Short: a retry-after beyond the deadline ends the plan at once.
    cfg["retry"] = {"max_attempts": 2, "backoff_base_ms": 5, "backoff_max_ms": 20, "deadline_s": 2}
    return await start_gateway(cfg)


def text_of(msg: anthropic.types.Message) -> str:
    return "".join(b.text for b in msg.content if b.type == "text")


MODELS = ["echo", "fake-model", "claude-text", "gemini-text"]


# -- the answer is the chat answer, in Anthropic's shape -------------------------------


@pytest.mark.parametrize("model", MODELS)
async def test_create_answers_what_chat_answers(gw: Gateway, model: str) -> None:
    chat = await gw.sdk().chat.completions.create(model=model, messages=HELLO)  # type: ignore[arg-type]
    raw = await gw.claude().messages.with_raw_response.create(
        model=model, max_tokens=100, messages=HELLO, extra_headers={"anthropic-version": "x"}
    )
    msg = await raw.parse()
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert text_of(msg) == chat.choices[0].message.content and text_of(msg)
    assert msg.stop_reason == "end_turn"
    assert chat.usage is not None
    cached = (msg.usage.cache_read_input_tokens or 0) + (msg.usage.cache_creation_input_tokens or 0)
    assert msg.usage.input_tokens + cached == chat.usage.prompt_tokens
    assert msg.usage.output_tokens == chat.usage.completion_tokens
    record = gw.settler.records[-1]
    assert record.api == "messages" and record.status == 200
    assert record.usage.prompt_tokens == chat.usage.prompt_tokens
    if model.startswith("claude-"):  # passed through: Anthropic's own message, its id
        assert msg.id == "msg_01XFDUDYJgAACzvnptvVoYEL"
    else:
        assert raw.headers["x-request-id"] == "req_" + msg.id.removeprefix("msg_")


@pytest.mark.parametrize("model", MODELS)
async def test_stream_answers_what_chat_answers(gw: Gateway, model: str) -> None:
    chunks = [
        c
        async for c in await gw.sdk().chat.completions.create(
            model=model,
            messages=HELLO,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    ]
    chat_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    chat_usage = chunks[-1].usage
    kinds: list[str] = []
    async with gw.claude().messages.stream(model=model, max_tokens=100, messages=HELLO) as stream:
        async for ev in stream:
            kinds.append(ev.type)
        final = await stream.get_final_message()
    assert text_of(final) == chat_text and chat_text
    assert kinds[:2] == ["message_start", "content_block_start"]  # the SDK hides ping
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert "text" in kinds  # the SDK's own text event, from each text_delta
    assert final.stop_reason == "end_turn"
    assert chat_usage is not None
    cached = (final.usage.cache_read_input_tokens or 0) + (
        final.usage.cache_creation_input_tokens or 0
    )
    assert final.usage.input_tokens + cached == chat_usage.prompt_tokens
    assert final.usage.output_tokens == chat_usage.completion_tokens
    record = gw.settler.records[-1]
    assert record.api == "messages" and record.stream and record.status == 200
    assert record.usage.completion_tokens == chat_usage.completion_tokens


async def test_stream_events_on_the_wire(gw: Gateway) -> None:
    """What the SDK hides: a ping after message_start, every event named as its type."""
    body = {"model": "fake-model", "max_tokens": 50, "messages": HELLO, "stream": True}
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": "tw-x"}) as r,
    ):
        raw = await r.read()
        assert r.headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in raw.split(b"\n\n") if e]
    names = [e.split(b"\n")[0].removeprefix(b"event: ").decode() for e in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names.count("content_block_delta") == len(WORDS)
    for e in events:
        data = orjson.loads(e.split(b"\ndata: ", 1)[1])
        assert data["type"] == e.split(b"\n")[0].removeprefix(b"event: ").decode()
        check_event(data)
    delta = orjson.loads(events[-2].split(b"\ndata: ", 1)[1])
    assert delta["usage"] == {
        "input_tokens": FAKE_USAGE["prompt_tokens"],
        "output_tokens": FAKE_USAGE["completion_tokens"],
    }


# -- tools ---------------------------------------------------------------------------


OPENAI_TOOL = {
    "type": "function",
    "function": {"name": WEATHER["name"], "parameters": WEATHER["input_schema"]},
}


async def _chat_calls(gw: Gateway, model: str, stream: bool) -> list[tuple[str, Any]]:
    """The tool calls the chat endpoint answers, as (name, parsed arguments)."""
    sdk = gw.sdk()
    if not stream:
        chat = await sdk.chat.completions.create(model=model, messages=HELLO, tools=[OPENAI_TOOL])  # type: ignore[arg-type, list-item]
        calls = chat.choices[0].message.tool_calls or []
        return [(c.function.name, orjson.loads(c.function.arguments)) for c in calls]  # type: ignore[union-attr]
    names: dict[int, str] = {}
    args: dict[int, str] = {}
    async for chunk in await sdk.chat.completions.create(
        model=model,
        messages=HELLO,  # type: ignore[arg-type]
        tools=[OPENAI_TOOL],  # type: ignore[list-item]
        stream=True,
    ):
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if call.function and call.function.name:
                names[call.index] = call.function.name
            args[call.index] = args.get(call.index, "") + (
                (call.function and call.function.arguments) or ""
            )
    return [(names[i], orjson.loads(args[i])) for i in sorted(names)]


@pytest.mark.parametrize("model", ["claude-tools", "gemini-tools"])
async def test_tool_use_create_and_stream(gw: Gateway, model: str) -> None:
    c = gw.claude()
    kw: dict[str, Any] = {"model": model, "max_tokens": 200, "messages": HELLO, "tools": [WEATHER]}
    msg = await c.messages.create(**kw)
    assert msg.stop_reason == "tool_use"
    uses = [(b.name, b.input) for b in msg.content if b.type == "tool_use"]
    assert uses == await _chat_calls(gw, model, stream=False) and len(uses) == 2
    async with c.messages.stream(**kw) as stream:
        deltas = [ev async for ev in stream if ev.type == "content_block_delta"]
        final = await stream.get_final_message()
    assert any(d.delta.type == "input_json_delta" for d in deltas)
    assert final.stop_reason == "tool_use"
    streamed = [(b.name, b.input) for b in final.content if b.type == "tool_use"]
    assert streamed == await _chat_calls(gw, model, stream=True) and streamed


def _tool_round(first: anthropic.types.Message) -> list[Any]:
    use = next(b for b in first.content if b.type == "tool_use")
    return [
        *HELLO,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": "18 C and sunny"},
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]


async def test_tool_result_round_reaches_each_provider_in_its_shape(
    gw: Gateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, fake_gemini: FakeGemini
) -> None:
    c = gw.claude()
    first = await c.messages.create(
        model="claude-tools", max_tokens=200, messages=HELLO, tools=[WEATHER]
    )
    use = next(b for b in first.content if b.type == "tool_use")
    messages = _tool_round(first)
    choice = {"type": "tool", "name": "get_weather"}
    for model in ("claude-text", "fake-model", "gemini-text"):
        await c.messages.create(
            model=model, max_tokens=200, messages=messages, tools=[WEATHER], tool_choice=choice
        )
    sent = fake_anthropic.seen[-1].body
    assert sent["messages"][1]["content"][1] == {
        "type": "tool_use",
        "id": use.id,
        "name": use.name,
        "input": use.input,
    }
    assert sent["messages"][2]["content"][0] == {
        "type": "tool_result",
        "tool_use_id": use.id,
        "content": "18 C and sunny",
    }
    assert sent["tool_choice"] == choice
    assert sent["tools"][0]["input_schema"] == WEATHER["input_schema"]
    chat = fake_openai.seen[-1].body
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant", "tool", "user"]
    assert chat["messages"][1]["tool_calls"][0]["id"] == use.id
    assert chat["messages"][2] == {
        "role": "tool",
        "tool_call_id": use.id,
        "content": "18 C and sunny",
    }
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    gemini = fake_gemini.seen[-1].body
    parts = [p for turn in gemini["contents"] for p in turn["parts"]]
    assert any("functionResponse" in p for p in parts)


async def test_images_reach_each_provider(
    gw: Gateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, fake_gemini: FakeGemini
) -> None:
    base64_image = {"type": "base64", "media_type": "image/png", "data": PNG}
    url_image = {"type": "url", "url": "https://example.com/cat.png"}
    content = [
        {"type": "image", "source": base64_image},
        {"type": "image", "source": url_image},
        {"type": "text", "text": "What is in these?"},
    ]
    messages = [{"role": "user", "content": content}]
    c = gw.claude()
    for model in ("fake-model", "claude-text", "gemini-text"):
        msg = await c.messages.create(model=model, max_tokens=50, messages=messages)  # type: ignore[arg-type]
        assert text_of(msg)
    parts = fake_openai.seen[-1].body["messages"][0]["content"]
    assert parts[0] == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
    assert parts[1] == {"type": "image_url", "image_url": {"url": url_image["url"]}}
    blocks = fake_anthropic.seen[-1].body["messages"][0]["content"]
    assert blocks[0] == {"type": "image", "source": base64_image}
    assert blocks[1] == {"type": "image", "source": url_image}
    gemini_parts = fake_gemini.seen[-1].body["contents"][0]["parts"]
    assert gemini_parts[0] == {"inlineData": {"mimeType": "image/png", "data": PNG}}


# -- the request translation ----------------------------------------------------------


def test_request_translation() -> None:
    body = {
        "model": "m",
        "max_tokens": 64,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}},
                ],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]},
        ],
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"],
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 5,
        "metadata": {"user_id": "u-1"},
        "stream": True,
    }
    assert to_chat(body) == {
        "model": "m",
        "max_tokens": 64,
        "messages": [
            {
                "role": "system",
                "content": [
                    {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}
                ],
            },
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "t1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"a":1}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "t1", "content": ""},
        ],
        "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "stop": ["END"],
        "temperature": 0.2,
        "top_p": 0.9,
        "user": "u-1",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert to_chat({**body, "tool_choice": {"type": "none"}})["tool_choice"] == "none"
    assert to_chat({**body, "tool_choice": {"type": "auto"}})["tool_choice"] == "auto"


# -- the stream translator ------------------------------------------------------------


def _chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return data_event({**base, "choices": choices, **extra})


def _call(index: int, args: str, name: str | None = None) -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {"arguments": args}}
    if name:
        call.update(id=f"call_{index}", type="function")
        call["function"]["name"] = name
    return {"tool_calls": [call]}


CHAT_SSE = b"".join(
    [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "Let me "}),
        b": keep-alive\n\n",
        _chunk({"content": "check \u00e9t\u00e9."}),
        _chunk(_call(0, "", "get_weather")),
        _chunk(_call(0, '{"location": ')),
        _chunk(_call(0, '"Paris"}')),
        _chunk(_call(1, '{"tz": "CET"}', "get_time")),
        _chunk({}, "tool_calls"),
        _chunk(usage={"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}),
        b"data: [DONE]\n\n",
    ]
)


def test_stream_translation_is_the_same_at_every_split_point() -> None:
    whole = MessagesStream("msg_x").feed(CHAT_SSE)
    for cut in range(len(CHAT_SSE) + 1):
        stream = MessagesStream("msg_x")
        assert stream.feed(CHAT_SSE[:cut]) + stream.feed(CHAT_SSE[cut:]) == whole, cut
    three = MessagesStream("msg_x")
    for a in range(0, len(CHAT_SSE), 37):
        assert (
            three.feed(CHAT_SSE[:a])
            + three.feed(CHAT_SSE[a : a + 50])
            + three.feed(CHAT_SSE[a + 50 :])
            == whole
        )
        three = MessagesStream("msg_x")


def test_stream_translation_events() -> None:
    out = MessagesStream("msg_x").feed(CHAT_SSE)
    events = [orjson.loads(e.split(b"\ndata: ", 1)[1]) for e in out.split(b"\n\n") if e]
    for e in events:
        check_event(e)
    assert [e["type"] for e in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "ping",  # the upstream's keep-alive comment
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert [s["index"] for s in starts] == [0, 1, 2]
    assert starts[1]["content_block"] == {
        "type": "tool_use",
        "id": "call_0",
        "name": "get_weather",
        "input": {},
    }
    args = [
        e["delta"]["partial_json"]
        for e in events
        if e["type"] == "content_block_delta" and e["index"] == 1
    ]
    assert orjson.loads("".join(args)) == {"location": "Paris"}
    assert events[-2] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"input_tokens": 30, "output_tokens": 12},
    }


def test_mid_stream_failure_is_an_error_event() -> None:
    stream = MessagesStream("msg_x")
    stream.feed(_chunk({"content": "Hi"}))
    out = stream.fail(UpstreamStreamBroken("cut"))
    assert out.startswith(b"event: error\ndata: ")
    err = orjson.loads(out.split(b"data: ", 1)[1])
    assert err == {"type": "error", "error": {"type": "api_error", "message": "cut"}}


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, (400, "invalid_request_error")),
        (401, (401, "authentication_error")),
        (403, (403, "permission_error")),
        (404, (404, "not_found_error")),
        (413, (413, "request_too_large")),
        (429, (429, "rate_limit_error")),
        (500, (500, "api_error")),
        (502, (500, "api_error")),
        (503, (529, "overloaded_error")),
        (504, (504, "timeout_error")),
    ],
)
def test_error_statuses(status: int, expected: tuple[int, str]) -> None:
    got, body = MessagesDoor.error(ProviderHTTPError(status, {"message": "m"}))
    assert (got, orjson.loads(body)["error"]["type"]) == expected


# -- errors through the SDK -----------------------------------------------------------


async def test_sdk_error_classes(gw: Gateway) -> None:
    c = gw.claude()
    with pytest.raises(anthropic.NotFoundError) as nf:
        await c.messages.create(model="nope", max_tokens=10, messages=HELLO)  # type: ignore[arg-type]
    assert nf.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": nf.value.body["error"]["message"]},  # type: ignore[index]
    }
    with pytest.raises(anthropic.RateLimitError):
        await c.messages.create(model="fake-error-429", max_tokens=10, messages=HELLO)  # type: ignore[arg-type]
    with pytest.raises(anthropic.OverloadedError):
        await c.messages.create(model="claude-overloaded", max_tokens=10, messages=HELLO)  # type: ignore[arg-type]
    with pytest.raises(anthropic.BadRequestError) as bad:
        await c.messages.create(model="echo", max_tokens=0, messages=HELLO)  # type: ignore[arg-type]
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


async def test_missing_max_tokens_and_bad_json_are_anthropic_400s(gw: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        for data in (orjson.dumps({"model": "echo", "messages": HELLO}), b"{not json"):
            async with s.post(gw.url + "/v1/messages", data=data) as r:
                body = await r.json()
                assert r.status == 400
                assert body["type"] == "error"
                assert body["error"]["type"] == "invalid_request_error"


async def test_cut_stream_ends_with_an_error_event(gw: Gateway) -> None:
    c = gw.claude()
    got: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as err:
        async with c.messages.stream(model="fake-cut", max_tokens=50, messages=HELLO) as stream:
            async for ev in stream:
                got.append(ev.type)
    assert "content_block_delta" in got
    assert err.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    # The client has the error event before the request is settled.
    await until(lambda: gw.settler.records, what="the request settled")
    assert gw.settler.records[-1].status == 502


# -- count_tokens ---------------------------------------------------------------------


async def test_count_tokens_is_what_the_prompt_is_billed(gw: Gateway) -> None:
    """The echo provider reports the gateway's own count of the chat prompt."""
    c = gw.claude()
    messages = [{"role": "user", "content": "How many tokens is this sentence, exactly?"}]
    counted = await c.messages.count_tokens(model="echo", messages=messages, system="Be brief.")  # type: ignore[arg-type]
    answered = await c.messages.create(
        model="echo",
        max_tokens=50,
        messages=messages,  # type: ignore[arg-type]
        system="Be brief.",
    )
    assert counted.input_tokens == answered.usage.input_tokens > 0
    with_tools = await c.messages.count_tokens(model="echo", messages=messages, tools=[WEATHER])  # type: ignore[arg-type]
    without = await c.messages.count_tokens(model="echo", messages=messages)  # type: ignore[arg-type]
    assert with_tools.input_tokens > without.input_tokens
    with pytest.raises(anthropic.BadRequestError):
        await c.messages.count_tokens(model="echo", messages=[])


async def test_count_tokens_routes_the_model_as_create_would(
    start_keyed: StartKeyed, fake_openai: FakeOpenAI
) -> None:
    """A count for a model that does not exist, or that the key's tier may
    not use, is the error ``create`` gives, not a number."""
    keyed = await start_keyed(billing_config(fake_openai.url), "free")  # echo, fake-model only
    c = keyed.claude()
    counted = await c.messages.count_tokens(model="fake-model", messages=HELLO)  # type: ignore[arg-type]
    assert counted.input_tokens > 0
    for counting in (True, False):
        for model, refused in (
            ("no-such-model", anthropic.NotFoundError),
            ("fake-held", anthropic.PermissionDeniedError),
        ):
            with pytest.raises(refused) as err:
                if counting:
                    await c.messages.count_tokens(model=model, messages=HELLO)  # type: ignore[arg-type]
                else:
                    await c.messages.create(model=model, max_tokens=10, messages=HELLO)  # type: ignore[arg-type]
            assert model in err.value.message


async def test_the_readme_sdk_snippet_runs(gw: Gateway) -> None:
    """The README's Anthropic SDK snippet, pasted into python (the README's
    curl example runs in tests/test_readme.py against ``make run``'s demo)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    (snippet,) = [b for b in blocks if "from anthropic import" in b]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        snippet.replace("http://127.0.0.1:8080", gw.url),
        env={**os.environ, "TOLLWAY_KEY": "tw-demo"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].startswith("Hello, Tollway! Usage(") and "output_tokens=5" in lines[0]
    assert lines[1] == "stream me" + str(int(lines[1].removeprefix("stream me")))
    assert int(lines[1].removeprefix("stream me")) > 0


# -- keys, usage rows, disconnects ------------------------------------------------------


async def test_keys_usage_rows_and_a_disconnect(
    start_keyed: StartKeyed,
    fake_openai: FakeOpenAI,
    pg: asyncpg.Pool,
) -> None:
    keyed = await start_keyed(billing_config(fake_openai.url))
    with pytest.raises(anthropic.AuthenticationError) as denied:
        await keyed.gw.claude(api_key="tw-not-a-key").messages.create(
            model="fake-model", max_tokens=10, messages=HELLO
        )
    assert denied.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    c = keyed.claude()
    await c.messages.create(model="fake-model", max_tokens=10, messages=HELLO)
    async with c.messages.stream(model="fake-model", max_tokens=10, messages=HELLO) as stream:
        await stream.get_final_message()
    # a client that walks away after the first words
    async with c.messages.stream(model="fake-held", max_tokens=10, messages=HELLO) as stream:
        async for ev in stream:
            if ev.type == "content_block_delta":
                break
    async with asyncio.timeout(5):
        await fake_openai.disconnected.wait()
    fake_openai.release.set()
    await wait_for(pg, USAGE_COUNT, keyed.tenant, expect=3)
    rows = await pg.fetch(USAGE_ROWS, keyed.tenant)
    assert [r["endpoint"] for r in rows] == ["messages"] * 3
    by_kind = {(r["stream"], r["status"]): r for r in rows}
    whole, streamed, gone = by_kind[(False, 200)], by_kind[(True, 200)], by_kind[(True, 499)]
    for row in (whole, streamed):
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            FAKE_USAGE["prompt_tokens"],
            FAKE_USAGE["completion_tokens"],
        )
        assert row["usage_source"] == "provider" and row["status"] == 200
    assert gone["client_disconnected"]
    assert gone["usage_source"] == "estimated"
    # billed what was delivered: the first word, not the whole answer
    assert 1 <= gone["completion_tokens"] < FAKE_USAGE["completion_tokens"]
    await until(lambda: len(keyed.gw.settler.records) >= 4)
    assert {r.api for r in keyed.gw.settler.records} == {"messages"}
