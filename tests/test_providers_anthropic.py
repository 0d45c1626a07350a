"""``kind: anthropic``: request/response/stream translation, golden fixtures,
split-point property, usage exactness, and the SDK end to end against a fake
Anthropic speaking the real wire format."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy.config.model import ProviderConfig
from proxy.core.errors import InvalidRequest, ProviderHTTPError, UpstreamStreamBroken
from proxy.providers.anthropic import AnthropicStreamTranslator, anthropic_error
from proxy.providers.anthropic_translate import JSON_OBJECT_HINT, from_anthropic, to_anthropic
from proxy.providers.translated import translate_stream
from tests.conftest import Gateway, StartGateway
from tests.fakes_providers import FakeAnthropic, decoded, fixture, golden, translate_pieces
from tests.schema import validate
from tests.waiting import until

CREATED = 1_700_000_000
STREAMS = ["text", "tools", "cache"]
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
    },
}


def translator(endpoint: str = "chat") -> AnthropicStreamTranslator:
    return AnthropicStreamTranslator(
        chat_id="chatcmpl-test", model="claude-x", created=CREATED, endpoint=endpoint
    )


async def translate(raw: bytes, endpoint: str = "chat", pieces: int = 1) -> list[bytes]:
    cuts = [raw[i * len(raw) // pieces : (i + 1) * len(raw) // pieces] for i in range(pieces)]
    return await translate_pieces(translate_stream, cuts, translator(endpoint))


# -- request translation ------------------------------------------------------------


def test_request_roles_images_tools_and_results() -> None:
    body: dict[str, Any] = {
        "model": "sonnet",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use metric."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather here?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}},
                ],
            },
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'},
                    },
                    {
                        "id": "toolu_2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "?"}]},
            {"role": "user", "content": "Thanks"},
        ],
    }
    out = to_anthropic(body, "chat", "claude-sonnet-4", False, 4096)
    assert out == {
        "model": "claude-sonnet-4",
        "max_tokens": 4096,
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use metric."}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather here?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": {"location": "Paris"},
                    },
                    {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "content": [{"type": "text", "text": "?"}],
                    },
                    {"type": "text", "text": "Thanks"},
                ],
            },
        ],
    }


def test_request_max_tokens_sampling_stop_and_user() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    assert to_anthropic({"messages": msgs}, "chat", "c", True, 333)["max_tokens"] == 333
    assert (
        to_anthropic({"messages": msgs, "max_tokens": 7}, "chat", "c", False, 333)["max_tokens"]
        == 7
    )
    body = {
        "messages": msgs,
        "max_completion_tokens": 9,
        "max_tokens": 7,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": "END",
        "user": "u-1",
        "presence_penalty": 1,  # no Anthropic equivalent: dropped
    }
    out = to_anthropic(body, "chat", "c", True, 333)
    assert out == {
        "model": "c",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 9,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u-1"},
        "stream": True,
    }
    assert to_anthropic({**body, "stop": ["a", "b"]}, "chat", "c", False, 1)["stop_sequences"] == [
        "a",
        "b",
    ]


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        (None, None, None),
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            None,
            {"type": "tool", "name": "get_weather"},
        ),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    ],
)
def test_request_tools_and_tool_choice(choice: Any, parallel: Any, expected: Any) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]}
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    out = to_anthropic(body, "chat", "c", False, 10)
    assert out["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather",
            "input_schema": WEATHER["function"]["parameters"],
        }
    ]
    assert out.get("tool_choice") == expected


def test_request_response_format() -> None:
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    out = to_anthropic({"messages": msgs, "response_format": fmt}, "chat", "c", False, 10)
    assert out["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    out = to_anthropic(
        {"messages": msgs, "response_format": {"type": "json_object"}}, "chat", "c", False, 10
    )
    assert out["system"] == [
        {"type": "text", "text": "S"},
        {"type": "text", "text": JSON_OBJECT_HINT},
    ]
    out = to_anthropic({"messages": msgs, "response_format": {"type": "text"}}, "chat", "c", 0, 1)
    assert "output_config" not in out and len(out["system"]) == 1


def test_request_legacy_prompt_becomes_one_user_message() -> None:
    out = to_anthropic({"prompt": ["Say hi"], "max_tokens": 5}, "completions", "c", False, 10)
    assert out["messages"] == [{"role": "user", "content": "Say hi"}]
    with pytest.raises(InvalidRequest) as exc:
        to_anthropic({"prompt": ["a", "b"]}, "completions", "c", False, 10)
    assert exc.value.param == "prompt"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 2}, "n"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages[0].content[0]",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            "messages[0].content[0].image_url",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "t", "function": {"name": "f", "arguments": "{"}}],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ],
)
def test_request_unsupported_inputs_are_400(body: dict[str, Any], param: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], **body}
    with pytest.raises(InvalidRequest) as exc:
        to_anthropic(body, "chat", "c", False, 10)
    assert exc.value.param == param and exc.value.status == 400


# -- golden: non-stream --------------------------------------------------------------


@pytest.mark.parametrize("name", ["text", "tools", "cache"])
def test_golden_message(name: str) -> None:
    msg = orjson.loads(fixture("anthropic", f"{name}.json"))
    out = from_anthropic(msg, chat_id="chatcmpl-test", created=CREATED, model="m", endpoint="chat")
    validate(out, "CreateChatCompletionResponse")
    golden("anthropic", f"{name}.message", out)


def test_golden_message_as_text_completion() -> None:
    msg = orjson.loads(fixture("anthropic", "text.json"))
    out = from_anthropic(msg, chat_id="cmpl-t", created=CREATED, model="m", endpoint="completions")
    validate(out, "CreateCompletionResponse")
    assert out["choices"] == [
        {
            "index": 0,
            "text": "Hello! How can I help you today?",
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]


def test_message_usage_counts_cache_reads_and_writes() -> None:
    msg = orjson.loads(fixture("anthropic", "cache.json"))
    out = from_anthropic(msg, chat_id="c", created=CREATED, model="m", endpoint="chat")
    assert out["usage"] == {
        "prompt_tokens": 21 + 1500 + 3000,
        "completion_tokens": 8,
        "total_tokens": 4529,
        "prompt_tokens_details": {"cached_tokens": 3000, "cache_write_tokens": 1500},
    }
    assert out["choices"][0]["finish_reason"] == "length"


# -- golden: streams -----------------------------------------------------------------


@pytest.mark.parametrize("name", STREAMS)
async def test_golden_stream(name: str) -> None:
    events = decoded(await translate(fixture("anthropic", f"{name}.sse")))
    chunks = [e for e in events if isinstance(e, dict)]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert {c["id"] for c in chunks} == {"chatcmpl-test"}
    assert {c["created"] for c in chunks} == {CREATED}
    assert events[-1] == "data: [DONE]"
    assert chunks[-1]["choices"] == [] and "usage" in chunks[-1]
    golden("anthropic", f"{name}.stream", events)


async def test_stream_tool_call_arguments_reassemble() -> None:
    chunks = [
        e
        for e in decoded(await translate(fixture("anthropic", "tools.sse")))
        if isinstance(e, dict)
    ]
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            for tc in choice["delta"].get("tool_calls") or ():
                slot = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
                slot["id"] += tc.get("id", "")
                slot["name"] += tc.get("function", {}).get("name", "")
                slot["arguments"] += tc["function"].get("arguments", "")
    assert [(c["id"], c["name"], orjson.loads(c["arguments"])) for c in calls.values()] == [
        (
            "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
            "get_weather",
            {"location": "San Francisco, CA", "unit": "fahrenheit"},
        ),
        ("toolu_01VqYq3Lr4bVa3rFhmPzzmS6", "get_time", {"tz": "America/Los_Angeles"}),
    ]
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


async def test_stream_usage_is_cumulative_not_summed() -> None:
    chunks = decoded(await translate(fixture("anthropic", "cache.sse")))
    usage = chunks[-2]["usage"]
    # message_start said output 1, message_delta says 42 (cumulative): 42, not 43;
    # message_delta repeats the input figures: counted once.
    assert usage == {
        "prompt_tokens": 4521,
        "completion_tokens": 42,
        "total_tokens": 4563,
        "prompt_tokens_details": {"cached_tokens": 3000, "cache_write_tokens": 1500},
    }
    assert chunks[-3]["choices"][0]["finish_reason"] == "stop"  # stop_sequence


async def test_stream_as_text_completion() -> None:
    events = decoded(await translate(fixture("anthropic", "text.sse"), endpoint="completions"))
    chunks = [e for e in events if isinstance(e, dict)]
    assert {c["object"] for c in chunks} == {"text_completion"}
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == "Hello! Héllo, wörld 👋"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


async def test_error_event_mid_stream_raises_after_partial_output() -> None:
    got: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        yield fixture("anthropic", "error.sse")

    with pytest.raises(UpstreamStreamBroken, match="overloaded_error"):
        async for event in translate_stream(body(), translator(), "fake"):
            got.append(event)
    assert [c["choices"][0]["delta"] for c in decoded(got)] == [
        {"role": "assistant", "content": ""},
        {"content": "Once upon a"},
    ]


async def test_stream_without_message_stop_is_broken() -> None:
    raw = fixture("anthropic", "text.sse")
    with pytest.raises(UpstreamStreamBroken, match="message_stop"):
        await translate(raw[: raw.index(b"event: message_stop")])
    with pytest.raises(UpstreamStreamBroken, match="mid-event"):
        await translate(raw[:-30])


@pytest.mark.parametrize("name", [*STREAMS, "error"])
async def test_split_at_every_byte_offset_gives_same_chunks(name: str) -> None:
    raw = fixture("anthropic", f"{name}.sse")
    crlf = raw.replace(b"\n", b"\r\n")
    whole = await _outcome(raw, [raw])
    assert whole == await _outcome(crlf, [crlf])
    for cut in range(1, len(raw)):
        assert await _outcome(raw, [raw[:cut], raw[cut:]]) == whole, cut
    for cut in range(1, len(crlf)):
        assert await _outcome(crlf, [crlf[:cut], crlf[cut:]]) == whole, cut


async def _outcome(raw: bytes, pieces: list[bytes]) -> tuple[list[bytes], str | None]:
    got: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    try:
        async for event in translate_stream(body(), translator(), "fake"):
            got.append(event)
    except UpstreamStreamBroken as exc:
        return got, exc.message
    return got, None


# -- end to end through the openai SDK ------------------------------------------------


def config(url: str, **provider: Any) -> dict[str, Any]:
    return {
        "auth": "none",
        # Short: a retry-after beyond the deadline ends the plan at once.
        "retry": {"max_attempts": 2, "backoff_base_ms": 5, "backoff_max_ms": 20, "deadline_s": 2},
        "providers": {
            "anthropic": {
                "kind": "anthropic",
                "base_url": url,
                "api_key": "sk-ant-secret",
                "default_max_tokens": 321,
                "timeouts": {"connect": 2, "first_byte": 2, "idle": 2, "total": 30},
                **provider,
            }
        },
        "models": [
            {"name": "sonnet", "targets": [{"provider": "anthropic", "model": "claude-text"}]},
            {"name": "claude-*", "targets": [{"provider": "anthropic"}]},
        ],
    }


@pytest.fixture
async def gw(start_gateway: StartGateway, fake_anthropic: FakeAnthropic) -> Gateway:
    return await start_gateway(config(fake_anthropic.url))


MSG = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hello"}]


async def test_e2e_chat_non_stream(gw: Gateway, fake_anthropic: FakeAnthropic) -> None:
    raw = await gw.sdk().chat.completions.with_raw_response.create(model="sonnet", messages=MSG)  # type: ignore[arg-type]
    resp = raw.parse()
    assert resp.choices[0].message.content == "Hello! How can I help you today?"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.id == "chatcmpl-" + raw.headers["x-request-id"]
    validate(resp.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse")
    seen = fake_anthropic.seen[-1]
    assert seen.path == "/v1/messages"
    assert seen.headers["x-api-key"] == "sk-ant-secret"
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in seen.headers
    assert seen.body == {
        "model": "claude-text",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 321,
        "system": [{"type": "text", "text": "Be nice."}],
    }
    usage = gw.settler.records[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.source) == (12, 10, "provider")


async def test_e2e_chat_stream_with_usage(gw: Gateway, fake_anthropic: FakeAnthropic) -> None:
    stream = await gw.sdk().chat.completions.create(
        model="claude-text",
        messages=MSG,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
        max_completion_tokens=50,
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "Hello! Héllo, wörld 👋"
    )
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 15
    assert (
        fake_anthropic.seen[-1].body["stream"] is True
        and fake_anthropic.seen[-1].body["max_tokens"] == 50
    )
    usage = gw.settler.records[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.source) == (25, 15, "provider")


async def test_e2e_stream_without_usage_request_hides_usage_chunk(gw: Gateway) -> None:
    stream = await gw.sdk().chat.completions.create(model="claude-text", messages=MSG, stream=True)  # type: ignore[arg-type]
    chunks = [c async for c in stream]
    assert all(c.choices for c in chunks)
    assert gw.settler.records[-1].usage.completion_tokens == 15


async def test_e2e_tool_calls_stream(gw: Gateway, fake_anthropic: FakeAnthropic) -> None:
    stream = await gw.sdk().chat.completions.create(
        model="claude-tools",
        messages=MSG,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        stream=True,
    )
    chunks = [c async for c in stream]
    args: dict[int, str] = {}
    for c in chunks:
        for tc in c.choices[0].delta.tool_calls or ():
            args[tc.index] = args.get(tc.index, "") + (
                tc.function.arguments or "" if tc.function else ""
            )
    assert orjson.loads(args[0]) == {"location": "San Francisco, CA", "unit": "fahrenheit"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert fake_anthropic.seen[-1].body["tool_choice"] == {"type": "any"}
    assert fake_anthropic.seen[-1].body["tools"][0]["input_schema"]["type"] == "object"


async def test_e2e_tool_calls_non_stream(gw: Gateway) -> None:
    resp = await gw.sdk().chat.completions.create(
        model="claude-tools",
        messages=MSG,
        tools=[WEATHER],  # type: ignore[arg-type,list-item]
    )
    msg = resp.choices[0].message
    assert resp.choices[0].finish_reason == "tool_calls"
    assert msg.content == "I'll check the weather in San Francisco and Tokyo."
    assert msg.tool_calls is not None
    assert [(t.id, orjson.loads(t.function.arguments)) for t in msg.tool_calls] == [  # type: ignore[union-attr]
        ("toolu_01A09q90qw90lq917835lq9", {"location": "San Francisco, CA", "unit": "celsius"}),
        ("toolu_01B7s8d7f6g5h4j3k2l1", {"location": "Tokyo"}),
    ]


@pytest.mark.parametrize("stream", [False, True])
async def test_e2e_cache_usage_reaches_billing(gw: Gateway, stream: bool) -> None:
    client = gw.sdk()
    if stream:
        chunks = await client.chat.completions.create(
            model="claude-cache", messages=MSG, stream=True
        )  # type: ignore[arg-type]
        _ = [c async for c in chunks]
    else:
        await client.chat.completions.create(model="claude-cache", messages=MSG)  # type: ignore[arg-type]
    usage = gw.settler.records[-1].usage
    completion = 42 if stream else 8
    assert (usage.prompt_tokens, usage.completion_tokens) == (4521, completion)
    assert usage.details == {"cached_tokens": 3000, "cache_write_tokens": 1500}
    assert usage.source == "provider"


@pytest.mark.parametrize(
    ("status", "kind", "out_status", "out_type", "code"),
    [
        (529, "overloaded_error", 503, "server_error", "overloaded"),
        (429, "rate_limit_error", 429, "requests", "rate_limit_exceeded"),
        (400, "invalid_request_error", 400, "invalid_request_error", "invalid_request_error"),
        (401, "authentication_error", 401, "invalid_request_error", "authentication_error"),
        (404, "not_found_error", 404, "invalid_request_error", "not_found_error"),
        (500, "api_error", 500, "server_error", "api_error"),
    ],
)
def test_error_mapping(status: int, kind: str, out_status: int, out_type: str, code: str) -> None:
    body = orjson.dumps({"type": "error", "error": {"type": kind, "message": "boom"}})
    cfg = ProviderConfig(name="claude", kind="anthropic")
    err = anthropic_error(status, body, {"retry-after": "3", "x-secret": "no"}, cfg)
    assert isinstance(err, ProviderHTTPError)
    assert err.http_status == out_status
    assert err.payload() == {
        "error": {"message": "boom", "type": out_type, "param": None, "code": code}
    }
    assert err.headers == {"retry-after": "3"}


def test_error_mapping_of_a_non_json_body() -> None:
    cfg = ProviderConfig(name="claude", kind="anthropic")
    err = anthropic_error(502, b"<html>bad gateway</html>", {}, cfg)
    assert err.http_status == 502
    assert err.payload()["error"]["message"] == "provider 'claude' returned HTTP 502"


async def test_e2e_overloaded_is_a_server_error(gw: Gateway, fake_anthropic: FakeAnthropic) -> None:
    # The adapter turns 529 into 503 (see test_error_mapping); its retry-after
    # of 3 s is beyond the 2 s deadline, so the plan ends after one attempt
    # with an overloaded provider's 503: the client knows to come back.
    with pytest.raises(openai.InternalServerError) as exc:
        await gw.sdk().chat.completions.create(model="claude-overloaded", messages=MSG)  # type: ignore[arg-type]
    assert exc.value.status_code == 503
    assert isinstance(exc.value.body, dict) and exc.value.body["code"] == "service_unavailable"
    assert len(fake_anthropic.seen) == 1 and gw.settler.records[-1].status == 503


async def test_e2e_bad_request_passes_status(gw: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        await gw.sdk().chat.completions.create(model="claude-badrequest", messages=MSG)  # type: ignore[arg-type]
    assert exc.value.body == {
        "message": "messages: field required",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_request_error",
    }


async def test_e2e_error_mid_stream_ends_with_error_event(gw: Gateway) -> None:
    body = {"model": "claude-error", "messages": MSG, "stream": True}
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base_url + "/chat/completions", json=body) as resp,
    ):
        raw = await resp.read()
    events = [orjson.loads(e.removeprefix(b"data: ")) for e in raw.split(b"\n\n") if e]
    assert events[1]["choices"][0]["delta"]["content"] == "Once upon a"
    assert events[-1]["error"]["code"] == "upstream_stream_broken"
    assert "overloaded_error" in events[-1]["error"]["message"]
    record = gw.settler.records[-1]
    assert record.status == 502
    # Anthropic's usage never came: what was delivered is estimated.
    assert record.usage.source == "estimated" and record.usage.completion_tokens >= 1


async def test_e2e_embeddings_are_a_clear_400(gw: Gateway, fake_anthropic: FakeAnthropic) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        await gw.sdk().embeddings.create(model="claude-text", input="hi")
    assert exc.value.body["code"] == "embeddings_not_supported"  # type: ignore[index]
    assert fake_anthropic.seen == []


async def test_e2e_legacy_completions(gw: Gateway, fake_anthropic: FakeAnthropic) -> None:
    client = gw.sdk()
    resp = await client.completions.create(model="claude-text", prompt="Say hello", max_tokens=20)
    assert resp.object == "text_completion" and resp.choices[0].text.startswith("Hello!")
    validate(resp.model_dump(mode="json", exclude_unset=True), "CreateCompletionResponse")
    assert fake_anthropic.seen[-1].body["messages"] == [{"role": "user", "content": "Say hello"}]
    stream = await client.completions.create(model="claude-text", prompt="Say hello", stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == "Hello! Héllo, wörld 👋"
    assert gw.settler.records[-1].usage.completion_tokens == 15


async def test_e2e_api_version_and_v1_base_url(
    start_gateway: StartGateway, fake_anthropic: FakeAnthropic
) -> None:
    gw = await start_gateway(
        config(
            fake_anthropic.url + "/v1", api_version="2099-01-01", headers={"anthropic-beta": "b1"}
        )
    )
    await gw.sdk().chat.completions.create(model="claude-text", messages=MSG)  # type: ignore[arg-type]
    seen = fake_anthropic.seen[-1]
    assert seen.path == "/v1/messages"
    assert seen.headers["anthropic-version"] == "2099-01-01"
    assert seen.headers["anthropic-beta"] == "b1"


async def test_e2e_client_disconnect_cancels_upstream(
    gw: Gateway, fake_anthropic: FakeAnthropic
) -> None:
    body = {"model": "claude-held", "messages": MSG, "stream": True}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(gw.base_url + "/chat/completions", json=body)
        seen = b""
        while b'"role":"assistant"' not in seen:
            seen += await resp.content.readany()
        resp.close()
    async with asyncio.timeout(5):
        await fake_anthropic.disconnected.wait()
    await until(lambda: gw.settler.records)
    assert gw.settler.records[-1].client_disconnected
    fake_anthropic.release.set()
