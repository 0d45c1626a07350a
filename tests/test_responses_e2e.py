"""``POST /v1/responses`` end to end through the official openai SDK, to every
kind of provider (fake OpenAI, fake Anthropic, fake Gemini, echo): answers
and every stream event valid against OpenAI's spec, tools round-tripped,
structured output, stored responses, errors as the SDK's exception classes."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import Gateway, StartGateway, all_providers_config
from tests.fakes import FAKE_USAGE, WORDS, FakeOpenAI
from tests.fakes_providers import FakeAnthropic, FakeGemini
from tests.responses_helpers import check_events, parse_events
from tests.schema import validate

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather at a place.",
    "parameters": {
        "type": "object",
        "properties": {"location": {"type": "string"}},
        "required": ["location"],
    },
    "strict": True,
}


@pytest.fixture
async def gw(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    fake_gemini: FakeGemini,
) -> Gateway:
    return await start_gateway(
        all_providers_config(fake_openai.url, fake_anthropic.url, fake_gemini.url)
    )


def check(resp: Any) -> dict[str, Any]:
    body = resp.model_dump(mode="json", by_alias=True, exclude_unset=True)
    validate(body, "Response")
    assert body["id"].startswith("resp_") and body["object"] == "response"
    return body


# ---- answers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "text", "usage"),
    [
        ("fake-model", "".join(WORDS), (11, 6)),
        ("claude-text", "Hello! How can I help you today?", (12, 10)),
        ("gemini-text", None, None),
        ("echo", "Say hello", None),
    ],
)
async def test_non_stream_every_provider(
    gw: Gateway, model: str, text: str | None, usage: tuple[int, int] | None
) -> None:
    resp = await gw.sdk().responses.create(model=model, input="Say hello", instructions="Be brief.")
    body = check(resp)
    assert resp.status == "completed" and resp.model
    assert resp.output[0].type == "message"
    assert resp.output_text and (text is None or resp.output_text == text)
    assert resp.instructions == "Be brief."
    assert resp.usage is not None
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens > 0
    if usage is not None:
        assert (resp.usage.input_tokens, resp.usage.output_tokens) == usage
    record = gw.settler.records[-1]
    assert record.api == "responses" and record.status == 200
    assert (record.usage.prompt_tokens, record.usage.completion_tokens) == (
        resp.usage.input_tokens,
        resp.usage.output_tokens,
    )
    assert body["store"] is True  # OpenAI's default, echoed (kept only with a database)


async def test_request_reaches_the_provider_as_chat(gw: Gateway, fake_openai: FakeOpenAI) -> None:
    await gw.sdk().responses.create(
        model="fake-model",
        instructions="Be brief.",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
                ],
            }
        ],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=50,
        temperature=0.2,
        top_p=0.9,
        reasoning={"effort": "low"},
        metadata={"team": "a"},
        store=False,
    )
    sent = fake_openai.seen[-1].body
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
    ]
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather at a place.",
                "parameters": WEATHER["parameters"],
                "strict": True,
            },
        }
    ]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent.get("max_completion_tokens", sent.get("max_tokens")) == 50
    assert (sent["temperature"], sent["top_p"], sent["reasoning_effort"]) == (0.2, 0.9, "low")
    assert "store" not in sent and "metadata" not in sent


async def test_structured_output_json_schema(gw: Gateway, fake_openai: FakeOpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"greeting": {"type": "string"}},
        "required": ["greeting"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "name": "greeting", "schema": schema, "strict": True}
    resp = await gw.sdk().responses.create(
        model="echo",
        input='{"greeting": "hi"}',
        text={"format": fmt},  # type: ignore[typeddict-item]
    )
    check(resp)
    assert json.loads(resp.output_text) == {"greeting": "hi"}
    assert resp.text is not None and resp.text.format is not None
    assert resp.text.format.type == "json_schema"
    await gw.sdk().responses.create(model="fake-model", input="x", text={"format": fmt})  # type: ignore[typeddict-item]
    assert fake_openai.seen[-1].body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "greeting", "schema": schema, "strict": True},
    }


# ---- streams ---------------------------------------------------------------


@pytest.mark.parametrize("model", ["fake-model", "claude-text", "gemini-text", "echo"])
async def test_stream_every_provider(gw: Gateway, model: str) -> None:
    stream = await gw.sdk().responses.create(model=model, input="Say hello there", stream=True)
    events = [e async for e in stream]
    check_events([e.model_dump(mode="json", by_alias=True, exclude_unset=True) for e in events])
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") >= 1
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-1]
    assert done.type == "response.completed"
    assert done.response.output_text == text and text
    assert done.response.usage is not None and done.response.usage.output_tokens > 0
    record = gw.settler.records[-1]
    assert record.api == "responses" and record.stream and record.status == 200
    assert record.usage.completion_tokens == done.response.usage.output_tokens
    assert record.usage.prompt_tokens == done.response.usage.input_tokens


async def test_stream_raw_events_against_the_spec(gw: Gateway) -> None:
    """The bytes on the wire: ``event:`` names its data, every event valid."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.base_url + "/responses",
            json={"model": "fake-model", "input": "hi", "stream": True},
        ) as r,
    ):
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        events = parse_events(await r.read())
    check_events(events)  # each against its own event schema, and:
    for event in events:
        validate(event, "ResponseStreamEvent")
    assert events[-1]["response"]["usage"]["total_tokens"] == FAKE_USAGE["total_tokens"]


# ---- tools -----------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_function_tools_round_trip(
    gw: Gateway, fake_anthropic: FakeAnthropic, stream: bool
) -> None:
    """A tool call from Anthropic comes back as a function_call item; its
    output goes back as a function_call_output and reaches Anthropic as a
    tool_result for the same call."""
    client = gw.sdk()
    ask: dict[str, Any] = {"model": "claude-tools", "input": "Weather in SF?", "tools": [WEATHER]}
    if stream:
        events = [e async for e in await client.responses.create(**ask, stream=True)]
        check_events([e.model_dump(mode="json", by_alias=True, exclude_unset=True) for e in events])
        kinds = [e.type for e in events]
        assert "response.function_call_arguments.delta" in kinds
        assert "response.function_call_arguments.done" in kinds
        resp = events[-1].response  # type: ignore[union-attr]
    else:
        resp = await client.responses.create(**ask)
        check(resp)
    calls = [item for item in resp.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    assert all(c.call_id.startswith("toolu_") for c in calls)
    assert json.loads(calls[0].arguments)["location"].startswith("San Francisco")
    follow: list[dict[str, Any]] = [{"role": "user", "content": "Weather in SF?"}]
    follow += [
        {"type": "function_call", "call_id": c.call_id, "name": c.name, "arguments": c.arguments}
        for c in calls
    ]
    follow += [
        {"type": "function_call_output", "call_id": c.call_id, "output": "15 degrees"}
        for c in calls
    ]
    answer = await client.responses.create(model="claude-text", input=follow, tools=[WEATHER])  # type: ignore[arg-type,list-item]
    check(answer)
    sent = fake_anthropic.seen[-1].body["messages"]
    assert sent[1]["role"] == "assistant"
    uses = [b["id"] for b in sent[1]["content"] if b["type"] == "tool_use"]
    assert uses == [c.call_id for c in calls]
    results = [b for m in sent[2:] for b in m["content"] if b["type"] == "tool_result"]
    assert [r["tool_use_id"] for r in results] == uses


async def test_gemini_parallel_function_calls(gw: Gateway) -> None:
    resp = await gw.sdk().responses.create(model="gemini-tools", input="Tokyo?", tools=[WEATHER])  # type: ignore[list-item]
    check(resp)
    names = [item.name for item in resp.output if item.type == "function_call"]
    assert names == ["get_weather", "get_time"]
    events = [
        e.model_dump(mode="json", by_alias=True, exclude_unset=True)
        async for e in await gw.sdk().responses.create(
            model="gemini-tools",
            input="Tokyo?",
            tools=[WEATHER],  # type: ignore[list-item]
            stream=True,
        )
    ]
    check_events(events)
    final = events[-1]["response"]["output"]
    assert [i["name"] for i in final if i["type"] == "function_call"] == names


# ---- errors ----------------------------------------------------------------


async def test_errors_are_the_sdks_exception_classes(gw: Gateway) -> None:
    client = gw.sdk()
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="no-such-model", input="hi")
    with pytest.raises(openai.RateLimitError):
        await client.responses.create(model="fake-error-429", input="hi")
    with pytest.raises(openai.BadRequestError) as bad:
        await client.responses.create(model="echo", input="hi", tools=[{"type": "web_search"}])
    assert "web_search" in str(bad.value)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve("resp_nope")  # nothing is stored without a database


async def test_provider_error_mid_stream_is_response_failed(gw: Gateway) -> None:
    stream = await gw.sdk().responses.create(model="fake-cut", input="hi", stream=True)
    events = [e async for e in stream]
    check_events([e.model_dump(mode="json", by_alias=True, exclude_unset=True) for e in events])
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed"
    assert events[-1].response.error is not None
    assert gw.settler.records[-1].api == "responses" and gw.settler.records[-1].status == 502
