"""End to end through the official openai SDK, as a user would drive Tollway."""

from __future__ import annotations

import base64
import struct

import openai
import pytest

from tests.conftest import Gateway
from tests.fakes import FAKE_USAGE, WORDS, FakeOpenAI
from tests.schema import validate

MSG = [{"role": "user", "content": "Say hello"}]


async def test_chat_non_stream(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    client = gateway.sdk()
    raw = await client.chat.completions.with_raw_response.create(model="fake-model", messages=MSG)
    resp = raw.parse()
    assert resp.choices[0].message.content == "".join(WORDS)
    assert resp.usage is not None and resp.usage.total_tokens == FAKE_USAGE["total_tokens"]
    validate(resp.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse")
    assert raw.headers["x-tollway-provider"] == "fake"
    assert raw.headers["x-tollway-model"] == "upstream-model"
    assert raw.headers["x-request-id"].startswith("req_")
    # the provider saw its own model name and key, never the client's
    seen = fake_openai.seen[-1]
    assert seen.body["model"] == "upstream-model"
    assert seen.headers["Authorization"] == "Bearer sk-provider-secret"
    assert seen.headers["X-Team"] == "tollway"
    record = gateway.settler.records[-1]
    assert record.usage.as_dict() == {
        "prompt_tokens": 11,
        "completion_tokens": 6,
        "source": "provider",
    }


async def test_chat_stream_without_usage_request(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    client = gateway.sdk()
    stream = await client.chat.completions.create(model="fake-model", messages=MSG, stream=True)
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(WORDS)
    # Tollway asked for usage on the client's behalf, but the client did not: no usage chunk.
    assert all(c.choices for c in chunks)
    for c in chunks:
        validate(
            c.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionStreamResponse"
        )
    assert fake_openai.seen[-1].body["stream_options"] == {"include_usage": True}
    assert gateway.settler.records[-1].usage.source == "provider"
    assert gateway.settler.records[-1].usage.completion_tokens == 6


async def test_chat_stream_with_usage(gateway: Gateway) -> None:
    client = gateway.sdk()
    stream = await client.chat.completions.create(
        model="fake-model", messages=MSG, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == FAKE_USAGE["total_tokens"]


async def test_legacy_completions(gateway: Gateway) -> None:
    resp = await gateway.sdk().completions.create(model="fake-model", prompt="Say hello")
    assert resp.choices[0].text == "".join(WORDS)
    validate(resp.model_dump(mode="json", exclude_unset=True), "CreateCompletionResponse")


async def test_embeddings_base64_default_and_float(gateway: Gateway) -> None:
    client = gateway.sdk()
    resp = await client.embeddings.create(model="fake-model", input=["a", "b"])
    assert [d.embedding for d in resp.data] == [[0.25, -0.5, 0.75]] * 2
    validate(resp.model_dump(mode="json", exclude_unset=True), "CreateEmbeddingResponse")
    floats = await client.embeddings.create(model="fake-model", input="a", encoding_format="float")
    assert floats.data[0].embedding == [0.25, -0.5, 0.75]
    assert gateway.settler.records[-1].usage.prompt_tokens == 5


async def test_echo_provider_stream_and_embeddings(gateway: Gateway) -> None:
    client = gateway.sdk()
    stream = await client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "the quick brown fox jumps"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "the quick brown fox jumps"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    emb = await client.embeddings.create(model="echo", input="x", dimensions=8)
    assert len(emb.data[0].embedding) == 8


async def test_models_list_and_retrieve(gateway: Gateway) -> None:
    client = gateway.sdk()
    models = await client.models.list()
    ids = [m.id for m in models.data]
    assert ids == ["echo", "fake-model", "fm"]  # patterns are not listed
    validate(models.model_dump(mode="json"), "ListModelsResponse")
    assert (await client.models.retrieve("fm")).id == "fm"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("nope")


async def test_glob_passes_name_through(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    await gateway.sdk().chat.completions.create(model="fake-turbo-9", messages=MSG)
    assert fake_openai.seen[-1].body["model"] == "fake-turbo-9"


async def test_unknown_fields_survive(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    await gateway.sdk().chat.completions.create(
        model="fake-model",
        messages=MSG,
        tools=tools,
        seed=7,
        logprobs=True,
        response_format={"type": "json_object"},
        extra_body={"vendor_knob": {"x": 1}},
    )
    body = fake_openai.seen[-1].body
    assert body["tools"] == tools and body["seed"] == 7 and body["logprobs"] is True
    assert body["response_format"] == {"type": "json_object"}
    assert body["vendor_knob"] == {"x": 1}


async def test_client_cannot_choose_upstream(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    await gateway.sdk(default_headers={"api-base": "http://127.0.0.2:1"}).chat.completions.create(
        model="fake-model",
        messages=MSG,
        extra_body={"api_base": "http://127.0.0.2:1", "base_url": "http://127.0.0.2:1"},
    )
    body = fake_openai.seen[-1].body
    assert "api_base" not in body and "base_url" not in body
    assert "api-base" not in {k.lower() for k in fake_openai.seen[-1].headers}


def _floats(b64: str) -> list[float]:
    raw = base64.b64decode(b64)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))
