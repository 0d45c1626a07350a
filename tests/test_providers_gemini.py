"""``kind: gemini``: request/response/stream translation, golden fixtures,
split-point property, usage exactness, embeddings, and the SDK end to end
against a fake Gemini speaking the real wire format (CRLF-framed SSE)."""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest

from proxy.config.model import ProviderConfig
from proxy.core.errors import InvalidRequest, ProviderHTTPError, UpstreamStreamBroken
from proxy.providers.gemini import GeminiStreamTranslator, api_root, gemini_error
from proxy.providers.gemini_translate import from_gemini, from_gemini_embed, to_gemini
from proxy.providers.translated import translate_stream
from tests.conftest import Gateway, StartGateway
from tests.fakes_providers import EMBEDDING, FakeGemini, decoded, fixture, golden, translate_pieces
from tests.schema import validate

CREATED = 1_700_000_000
STREAMS = ["text", "thinking", "tools", "safety", "blocked"]
SIG = "CikBcsjafFK168IbtVtoxVV0Tsn8O+eU45rzJahzwuKGmMbd"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "additionalProperties": False,
        },
    },
}


def translator(endpoint: str = "chat") -> GeminiStreamTranslator:
    return GeminiStreamTranslator(
        chat_id="chatcmpl-test", model="gemini-x", created=CREATED, endpoint=endpoint
    )


async def translate(raw: bytes, endpoint: str = "chat") -> list[bytes]:
    return await translate_pieces(translate_stream, [raw], translator(endpoint))


# -- request translation ------------------------------------------------------------


def test_request_roles_media_tools_and_results() -> None:
    body: dict[str, Any] = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "image_url", "image_url": {"url": "https://x.test/cat.png?s=1"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": f"call_r_0_0~ts~{SIG}",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"location":"Tokyo"}'},
                    },
                    {
                        "id": "call_r_0_1",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": "{}"},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": f"call_r_0_0~ts~{SIG}", "content": '{"temp": 18}'},
            {"role": "tool", "tool_call_id": "call_r_0_1", "content": "09:00"},
            {"role": "assistant", "content": "18C at 09:00."},
            {"role": "user", "content": "Thanks"},
        ]
    }
    assert to_gemini(body, "chat") == {
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": "Weather?"},
                    {"inlineData": {"mimeType": "image/png", "data": "AAAA"}},
                    {
                        "fileData": {
                            "mimeType": "image/png",
                            "fileUri": "https://x.test/cat.png?s=1",
                        }
                    },
                ],
            },
            {
                "role": "model",
                "parts": [
                    {
                        "functionCall": {"name": "get_weather", "args": {"location": "Tokyo"}},
                        "thoughtSignature": SIG,
                    },
                    {"functionCall": {"name": "get_time", "args": {}}},
                ],
            },
            {
                "role": "user",
                "parts": [
                    {"functionResponse": {"name": "get_weather", "response": {"temp": 18}}},
                    {"functionResponse": {"name": "get_time", "response": {"content": "09:00"}}},
                ],
            },
            {"role": "model", "parts": [{"text": "18C at 09:00."}]},
            {"role": "user", "parts": [{"text": "Thanks"}]},
        ],
    }


def test_request_generation_config() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.3,
        "top_p": 0.8,
        "max_tokens": 100,
        "stop": "END",
        "n": 2,
        "seed": 7,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    }
    assert to_gemini(body, "chat")["generationConfig"] == {
        "temperature": 0.3,
        "topP": 0.8,
        "maxOutputTokens": 100,
        "stopSequences": ["END"],
        "candidateCount": 2,
        "seed": 7,
        "responseMimeType": "application/json",
        "responseJsonSchema": schema,
    }
    body = {
        **body,
        "max_completion_tokens": 9,
        "stop": ["a"],
        "response_format": {"type": "json_object"},
    }
    config = to_gemini(body, "chat")["generationConfig"]
    assert config["maxOutputTokens"] == 9 and config["stopSequences"] == ["a"]
    assert config["responseMimeType"] == "application/json" and "responseJsonSchema" not in config
    assert "generationConfig" not in to_gemini({"messages": body["messages"]}, "chat")


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, None),
        ("auto", {"functionCallingConfig": {"mode": "AUTO"}}),
        ("none", {"functionCallingConfig": {"mode": "NONE"}}),
        ("required", {"functionCallingConfig": {"mode": "ANY"}}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}},
        ),
    ],
)
def test_request_tools_and_tool_choice(choice: Any, expected: Any) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]}
    if choice is not None:
        body["tool_choice"] = choice
    out = to_gemini(body, "chat")
    # Full JSON Schema (additionalProperties and all) goes as parametersJsonSchema.
    decl = {"name": "get_weather", "parametersJsonSchema": WEATHER["function"]["parameters"]}
    assert out["tools"] == [{"functionDeclarations": [decl]}]
    assert out.get("toolConfig") == expected


def test_request_legacy_prompt_and_errors() -> None:
    out = to_gemini({"prompt": "Say hi", "max_tokens": 5}, "completions")
    assert out == {
        "contents": [{"role": "user", "parts": [{"text": "Say hi"}]}],
        "generationConfig": {"maxOutputTokens": 5},
    }
    with pytest.raises(InvalidRequest) as exc:
        to_gemini({"messages": [{"role": "tool", "tool_call_id": "x", "content": "1"}]}, "chat")
    assert exc.value.param == "messages[0].tool_call_id"
    with pytest.raises(InvalidRequest) as exc:
        to_gemini({"prompt": [[1, 2, 3]]}, "completions")
    assert exc.value.param == "prompt"


# -- golden: non-stream --------------------------------------------------------------


@pytest.mark.parametrize("name", ["text", "thinking", "tools", "safety", "blocked"])
def test_golden_response(name: str) -> None:
    resp = orjson.loads(fixture("gemini", f"{name}.json"))
    out = from_gemini(resp, chat_id="chatcmpl-test", created=CREATED, model="m", endpoint="chat")
    validate(out, "CreateChatCompletionResponse")
    golden("gemini", f"{name}.response", out)


def test_response_usage_counts_thoughts_and_cache() -> None:
    resp = orjson.loads(fixture("gemini", "thinking.json"))
    out = from_gemini(resp, chat_id="c-1", created=CREATED, model="m", endpoint="chat")
    assert out["usage"] == {
        "prompt_tokens": 1200,
        "completion_tokens": 3 + 100,
        "total_tokens": 1303,
        "prompt_tokens_details": {"cached_tokens": 1024},
        "completion_tokens_details": {"reasoning_tokens": 100},
    }
    assert out["choices"][0]["message"]["content"] == "42."  # the thought is not the answer
    assert out["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("name", ["safety", "blocked"])
def test_safety_blocks_are_content_filter(name: str) -> None:
    resp = orjson.loads(fixture("gemini", f"{name}.json"))
    out = from_gemini(resp, chat_id="c-1", created=CREATED, model="m", endpoint="completions")
    validate(out, "CreateCompletionResponse")
    assert out["choices"] == [
        {"index": 0, "text": "", "logprobs": None, "finish_reason": "content_filter"}
    ]


def test_embeddings_response_floats_and_base64() -> None:
    resp = {"embeddings": [{"values": [0.5, -1.0]}, {"values": [0.25, 2.0]}]}
    out = from_gemini_embed(resp, model="e", as_base64=False, prompt_tokens=3)
    validate(out, "CreateEmbeddingResponse")
    assert [d["embedding"] for d in out["data"]] == [[0.5, -1.0], [0.25, 2.0]]
    assert out["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    packed = from_gemini_embed(resp, model="e", as_base64=True, prompt_tokens=3)
    raw = base64.b64decode(packed["data"][1]["embedding"])
    assert struct.unpack("<2f", raw) == (0.25, 2.0)


# -- golden: streams -----------------------------------------------------------------


@pytest.mark.parametrize("name", STREAMS)
async def test_golden_stream(name: str) -> None:
    events = decoded(await translate(fixture("gemini", f"{name}.sse")))
    chunks = [e for e in events if isinstance(e, dict)]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert {c["id"] for c in chunks} == {"chatcmpl-test"}
    assert events[-1] == "data: [DONE]"
    assert chunks[-1]["choices"] == [] and "usage" in chunks[-1]
    golden("gemini", f"{name}.stream", events)


async def test_stream_usage_is_the_last_report_with_thoughts() -> None:
    chunks = decoded(await translate(fixture("gemini", "thinking.sse")))
    assert chunks[-2]["usage"] == {
        "prompt_tokens": 1200,
        "completion_tokens": 6 + 250,
        "total_tokens": 1456,
        "prompt_tokens_details": {"cached_tokens": 1024},
        "completion_tokens_details": {"reasoning_tokens": 250},
    }
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-2])
    assert text == "Forty-two. Really."


async def test_stream_as_text_completion() -> None:
    events = decoded(await translate(fixture("gemini", "text.sse"), endpoint="completions"))
    chunks = [e for e in events if isinstance(e, dict)]
    assert {c["object"] for c in chunks} == {"text_completion"}
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == "The capital of France is Paris — Ça va? 🇫🇷"


async def test_error_mid_stream_and_missing_finish_are_broken() -> None:
    with pytest.raises(UpstreamStreamBroken, match="UNAVAILABLE"):
        await translate(fixture("gemini", "error.sse"))
    raw = fixture("gemini", "text.sse")
    with pytest.raises(UpstreamStreamBroken, match="finishReason"):
        await translate(raw[: raw.rindex(b"data: ")])


@pytest.mark.parametrize("name", [*STREAMS, "error"])
async def test_split_at_every_byte_offset_gives_same_chunks(name: str) -> None:
    crlf = fixture("gemini", f"{name}.sse")
    lf = crlf.replace(b"\r\n", b"\n")
    whole = await _outcome([crlf])
    assert whole == await _outcome([lf])
    for raw in (crlf, lf):
        for cut in range(1, len(raw)):
            assert await _outcome([raw[:cut], raw[cut:]]) == whole, cut
    # and three pieces around every CRLF pair, where a naive splitter slips
    for cut in (i for i in range(1, len(crlf) - 1) if crlf[i : i + 1] in b"\r\n"):
        assert await _outcome([crlf[:cut], crlf[cut : cut + 1], crlf[cut + 1 :]]) == whole


async def _outcome(pieces: list[bytes]) -> tuple[list[bytes], str | None]:
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


@pytest.mark.parametrize(
    ("status", "grpc", "out_type", "code"),
    [
        (429, "RESOURCE_EXHAUSTED", "requests", "rate_limit_exceeded"),
        (400, "INVALID_ARGUMENT", "invalid_request_error", "invalid_argument"),
        (403, "PERMISSION_DENIED", "invalid_request_error", "permission_denied"),
        (503, "UNAVAILABLE", "server_error", "unavailable"),
    ],
)
def test_error_mapping(status: int, grpc: str, out_type: str, code: str) -> None:
    body = orjson.dumps([{"error": {"code": status, "message": "boom", "status": grpc}}])
    err = gemini_error(status, body, {"retry-after": "9"}, ProviderConfig("g", "gemini"))
    assert isinstance(err, ProviderHTTPError) and err.http_status == status
    assert err.payload() == {
        "error": {"message": "boom", "type": out_type, "param": None, "code": code}
    }
    assert err.headers == {"retry-after": "9"}


def test_api_root() -> None:
    def root(url: str, version: str | None = None) -> str:
        return api_root(ProviderConfig("g", "gemini", base_url=url, api_version=version))

    assert root("https://generativelanguage.googleapis.com") == (
        "https://generativelanguage.googleapis.com/v1beta"
    )
    assert root("https://generativelanguage.googleapis.com", "v1") == (
        "https://generativelanguage.googleapis.com/v1"
    )
    assert root("https://proxy.test/google/v1beta") == "https://proxy.test/google/v1beta"


# -- end to end through the openai SDK ------------------------------------------------


def config(url: str) -> dict[str, Any]:
    return {
        "auth": "none",
        "providers": {
            "gemini": {
                "kind": "gemini",
                "base_url": url,
                "api_key": "AIza-secret",
                "timeouts": {"connect": 2, "first_byte": 2, "idle": 2, "total": 30},
            }
        },
        "models": [
            {"name": "flash", "targets": [{"provider": "gemini", "model": "gemini-text"}]},
            {"name": "gemini-*", "targets": [{"provider": "gemini"}]},
        ],
    }


@pytest.fixture
async def gw(start_gateway: StartGateway, fake_gemini: FakeGemini) -> Gateway:
    return await start_gateway(config(fake_gemini.url))  # no version in the URL: v1beta is added


MSG = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hello"}]


async def test_e2e_chat_non_stream(gw: Gateway, fake_gemini: FakeGemini) -> None:
    resp = await gw.sdk().chat.completions.create(model="flash", messages=MSG, temperature=0.5)  # type: ignore[arg-type]
    assert resp.choices[0].message.content == "Hello! How can I help you today?"
    assert resp.model == "gemini-2.0-flash"
    validate(resp.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse")
    seen = fake_gemini.seen[-1]
    assert seen.path == "/v1beta/models/gemini-text:generateContent"
    assert seen.query == {}  # the key is never in the URL
    assert seen.headers["x-goog-api-key"] == "AIza-secret"
    assert "Authorization" not in seen.headers
    assert seen.body == {
        "contents": [{"role": "user", "parts": [{"text": "Hello"}]}],
        "systemInstruction": {"parts": [{"text": "Be nice."}]},
        "generationConfig": {"temperature": 0.5},
    }
    usage = gw.settler.records[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.source) == (8, 9, "provider")


async def test_e2e_chat_stream(gw: Gateway, fake_gemini: FakeGemini) -> None:
    stream = await gw.sdk().chat.completions.create(
        model="gemini-text",
        messages=MSG,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital of France is Paris — Ça va? 🇫🇷"
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 13
    seen = fake_gemini.seen[-1]
    assert seen.path == "/v1beta/models/gemini-text:streamGenerateContent"
    assert seen.query == {"alt": "sse"}
    usage = gw.settler.records[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.source) == (4, 13, "provider")


async def test_e2e_tool_round_trip(gw: Gateway, fake_gemini: FakeGemini) -> None:
    client = gw.sdk()
    stream = await client.chat.completions.create(
        model="gemini-tools",
        messages=MSG,
        tools=[WEATHER],
        stream=True,  # type: ignore[arg-type,list-item]
    )
    calls: dict[int, Any] = {}
    async for c in stream:
        for tc in c.choices[0].delta.tool_calls or ():
            calls[tc.index] = tc
        finish = c.choices[0].finish_reason
    assert finish == "tool_calls"
    assert [(t.function.name, orjson.loads(t.function.arguments)) for t in calls.values()] == [  # type: ignore[union-attr,arg-type]
        ("get_weather", {"location": "Tokyo"}),
        ("get_time", {"tz": "Asia/Tokyo"}),
    ]
    assert calls[0].id.endswith("~ts~" + SIG)
    history = [
        *MSG,
        {
            "role": "assistant",
            "tool_calls": [
                {"id": t.id, "type": "function", "function": t.function.model_dump()}
                for t in calls.values()
            ],
        },
        {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"},
        {"role": "tool", "tool_call_id": calls[1].id, "content": '{"time": "09:00"}'},
    ]
    await client.chat.completions.create(model="gemini-text", messages=history)  # type: ignore[arg-type]
    contents = fake_gemini.seen[-1].body["contents"]
    assert contents[1]["parts"][0]["thoughtSignature"] == SIG
    assert contents[2] == {
        "role": "user",
        "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"content": "sunny"}}},
            {"functionResponse": {"name": "get_time", "response": {"time": "09:00"}}},
        ],
    }


@pytest.mark.parametrize("stream", [False, True])
async def test_e2e_thoughts_and_cache_reach_billing(gw: Gateway, stream: bool) -> None:
    client = gw.sdk()
    if stream:
        chunks = await client.chat.completions.create(
            model="gemini-thinking", messages=MSG, stream=True
        )  # type: ignore[arg-type]
        _ = [c async for c in chunks]
    else:
        await client.chat.completions.create(model="gemini-thinking", messages=MSG)  # type: ignore[arg-type]
    usage = gw.settler.records[-1].usage
    thoughts, answer = (250, 6) if stream else (100, 3)
    assert (usage.prompt_tokens, usage.completion_tokens) == (1200, thoughts + answer)
    assert usage.details == {"cached_tokens": 1024, "reasoning_tokens": thoughts}
    assert usage.source == "provider"


@pytest.mark.parametrize("stream", [False, True])
async def test_e2e_safety_block_is_content_filter(gw: Gateway, stream: bool) -> None:
    client = gw.sdk()
    if stream:
        chunks = [
            c
            async for c in await client.chat.completions.create(
                model="gemini-safety", messages=MSG, stream=True
            )
        ]  # type: ignore[arg-type]
        assert chunks[-1].choices[0].finish_reason == "content_filter"
    else:
        resp = await client.chat.completions.create(model="gemini-blocked", messages=MSG)  # type: ignore[arg-type]
        assert resp.choices[0].finish_reason == "content_filter"
        assert resp.choices[0].message.content is None


async def test_e2e_embeddings(gw: Gateway, fake_gemini: FakeGemini) -> None:
    client = gw.sdk()
    resp = await client.embeddings.create(model="gemini-embed", input=["a", "b"], dimensions=3)
    assert [d.embedding for d in resp.data] == [
        EMBEDDING,
        [v * 2 for v in EMBEDDING],
    ]  # base64 by default
    validate(resp.model_dump(mode="json", exclude_unset=True), "CreateEmbeddingResponse")
    seen = fake_gemini.seen[-1]
    assert seen.path == "/v1beta/models/gemini-embed:batchEmbedContents"
    assert seen.body == {
        "requests": [
            {
                "model": "models/gemini-embed",
                "content": {"parts": [{"text": t}]},
                "outputDimensionality": 3,
            }
            for t in ("a", "b")
        ]
    }
    floats = await client.embeddings.create(
        model="gemini-embed", input="a", encoding_format="float"
    )
    assert floats.data[0].embedding == EMBEDDING
    usage = gw.settler.records[-1].usage
    assert usage.source == "estimated" and usage.prompt_tokens == floats.usage.prompt_tokens == 1


async def test_e2e_legacy_completions(gw: Gateway, fake_gemini: FakeGemini) -> None:
    client = gw.sdk()
    resp = await client.completions.create(model="gemini-text", prompt="Say hello")
    assert resp.choices[0].text == "Hello! How can I help you today?"
    validate(resp.model_dump(mode="json", exclude_unset=True), "CreateCompletionResponse")
    assert fake_gemini.seen[-1].body["contents"] == [
        {"role": "user", "parts": [{"text": "Say hello"}]}
    ]
    stream = await client.completions.create(model="gemini-text", prompt="Say hello", stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == "The capital of France is Paris — Ça va? 🇫🇷"


async def test_e2e_quota_error_passes_on(gw: Gateway) -> None:
    with pytest.raises(openai.RateLimitError) as exc:
        await gw.sdk().chat.completions.create(model="gemini-quota", messages=MSG)  # type: ignore[arg-type]
    assert exc.value.body == {
        "message": "Quota exceeded",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
