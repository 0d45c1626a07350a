"""A front door's request passed through to a provider that speaks its API:
Anthropic's Messages to ``kind: anthropic``, OpenAI's Responses to ``kind:
openai`` with ``responses: true``. Through the official SDKs, against fake
providers that record what they receive and answer in their own wire
format: what only the native API carries (thinking, ``top_k``, the matched
stop sequence, reasoning items) survives both ways, usage is billed exactly
(cache tokens included, a cut stream by what was delivered), and a fallback
to another provider, or a stage that must see the answer, is translated."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from proxy.core import tokens
from proxy.doors.messages import MessagesDoor
from proxy.doors.responses import ResponsesDoor
from proxy.pipeline.registry import parse_config
from tests.billing_helpers import OF_TENANT, USAGE_COUNT, billing_config, wait_for
from tests.conftest import (
    TEST_TIMEOUTS,
    Gateway,
    StartGateway,
    StartKeyed,
    anthropic_provider,
    gateway_config,
)
from tests.fakes import WORDS, FakeOpenAI
from tests.fakes_providers import FakeAnthropic
from tests.fakes_responses import REASONING, TEXT
from tests.responses_helpers import parse_events
from tests.waiting import until

HELLO = [{"role": "user", "content": "Say hello"}]
THINKING = {"type": "enabled", "budget_tokens": 1024}
# Anthropic's thinking fixtures: input 40, cache writes 200, cache reads 1000, output 25.
CACHE = {"cached_tokens": 1000, "cache_write_tokens": 200}


def config(
    openai_url: str, anthropic_url: str, base: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    cfg = base or gateway_config(openai_url, **extra)
    cfg["retry"] = {"max_attempts": 3, "backoff_base_ms": 5, "backoff_max_ms": 20, "deadline_s": 5}
    cfg["providers"]["anthropic"] = anthropic_provider(anthropic_url)
    cfg["providers"]["openai"] = {
        "kind": "openai",
        "base_url": openai_url,
        "api_key": "sk-openai-secret",
        "responses": True,
        "timeouts": dict(TEST_TIMEOUTS),
    }
    cfg["models"] += [
        {"name": "claude-*", "targets": [{"provider": "anthropic"}]},
        {"name": "gpt-native", "targets": [{"provider": "openai", "model": "upstream-model"}]},
        {"name": "gpt-cut", "targets": [{"provider": "openai", "model": "cut"}]},
        {"name": "gpt-failed", "targets": [{"provider": "openai", "model": "failed"}]},
        {
            "name": "native-first",
            "targets": [{"provider": "anthropic", "model": "claude-fail"}],
            "fallbacks": ["fake-model"],
        },
    ]
    return cfg


@pytest.fixture
async def ant() -> AsyncIterator[FakeAnthropic]:
    server = FakeAnthropic()
    await server.start()
    yield server
    server.release.set()
    await server.close()


@pytest.fixture
async def gw(start_gateway: StartGateway, fake_openai: FakeOpenAI, ant: FakeAnthropic) -> Gateway:
    return await start_gateway(config(fake_openai.url, ant.url))


def asked(model: str, **more: Any) -> dict[str, Any]:
    """A Messages request only the Messages API can carry whole."""
    return {
        "model": model,
        "max_tokens": 2048,
        "messages": HELLO,
        "thinking": THINKING,
        "top_k": 5,
        "stop_sequences": ["END"],
        **more,
    }


def sdk_args(model: str) -> dict[str, Any]:
    """``asked`` as the SDK's arguments (its ``create`` no longer names ``top_k``)."""
    args = asked(model)
    return {**{k: v for k, v in args.items() if k != "top_k"}, "extra_body": {"top_k": 5}}


# -- Messages to Anthropic ---------------------------------------------------------


async def test_messages_go_to_anthropic_as_sent_and_thinking_comes_back(
    gw: Gateway, ant: FakeAnthropic
) -> None:
    msg = await gw.claude().messages.create(**sdk_args("claude-thinking"))
    seen = ant.seen[-1]
    assert seen.path == "/v1/messages"
    assert seen.body == asked("claude-thinking")  # untouched: thinking and top_k included
    assert seen.headers["x-api-key"] == "sk-ant-secret"
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == "The user wants a short greeting."  # type: ignore[union-attr]
    assert msg.content[0].signature  # type: ignore[union-attr]
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "END"
    assert msg.id == "msg_01ThinkingExample"
    assert msg.usage.cache_read_input_tokens == 1000
    record = gw.settler.records[-1]
    assert record.api == "messages" and record.status == 200 and record.provider == "anthropic"
    assert (record.usage.prompt_tokens, record.usage.completion_tokens) == (1240, 25)
    assert record.usage.source == "provider" and record.usage.details == CACHE


async def test_the_clients_beta_flags_go_to_anthropic_only(
    gw: Gateway, ant: FakeAnthropic, fake_openai: FakeOpenAI
) -> None:
    beta = "interleaved-thinking-2025-05-14"
    # The SDK's own beta surface sends them as the anthropic-beta header.
    msg = await gw.claude().beta.messages.create(**sdk_args("claude-thinking"), betas=[beta])
    assert msg.content[0].type == "thinking"
    assert ant.seen[-1].headers["anthropic-beta"] == beta
    async with gw.claude().beta.messages.stream(
        **sdk_args("claude-thinking"), betas=[beta]
    ) as stream:
        await stream.get_final_message()
    assert ant.seen[-1].headers["anthropic-beta"] == beta
    # Translated to another provider, or another door's pass-through: not sent.
    await gw.claude().beta.messages.create(
        model="fake-model", max_tokens=50, messages=HELLO, betas=[beta]
    )
    assert fake_openai.seen[-1].path == "/v1/chat/completions"
    assert "anthropic-beta" not in {k.lower() for k in fake_openai.seen[-1].headers}
    await gw.sdk().responses.create(
        model="gpt-native", input="Say hello", extra_headers={"anthropic-beta": beta}
    )
    assert fake_openai.seen[-1].path == "/v1/responses"
    assert "anthropic-beta" not in {k.lower() for k in fake_openai.seen[-1].headers}


async def test_a_stream_passes_through_with_its_thinking_block(
    gw: Gateway, ant: FakeAnthropic
) -> None:
    async with gw.claude().messages.stream(**sdk_args("claude-thinking")) as stream:
        kinds = [event.type async for event in stream]
        msg = await stream.get_final_message()
    assert ant.seen[-1].body == {**asked("claude-thinking"), "stream": True}
    assert "thinking" in kinds and "signature" in kinds  # the SDK's thinking_delta events
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[1].text == "Hello there!"  # type: ignore[union-attr]
    assert msg.stop_sequence == "END" and msg.id == "msg_01ThinkingStream"
    record = gw.settler.records[-1]
    assert record.status == 200 and record.stream
    assert (record.usage.prompt_tokens, record.usage.completion_tokens) == (1240, 25)
    assert record.usage.source == "provider" and record.usage.details == CACHE


async def test_a_client_that_leaves_mid_stream_is_billed_what_it_was_sent(
    gw: Gateway, ant: FakeAnthropic
) -> None:
    got = b""
    async with aiohttp.ClientSession() as http:
        body = {**asked("claude-heldtext"), "stream": True}
        async with http.post(f"{gw.url}/v1/messages", json=body) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_any():
                got += chunk
                if b'"text_delta"' in got and got.endswith(b"\n\n"):
                    break
    await until(lambda: ant.disconnected.is_set())  # the provider's request was cancelled
    await until(lambda: any(r.client_disconnected for r in gw.settler.records))
    record = gw.settler.records[-1]
    assert record.status == 499
    delivered = "The user wants a short greeting." + "Hello"
    assert record.usage.prompt_tokens == 1240  # as message_start reported it
    assert record.usage.completion_tokens == tokens.count_text(delivered, "claude-heldtext")
    assert record.usage.source == "estimated" and record.usage.details == CACHE


async def test_a_failed_native_attempt_falls_back_to_a_translated_one(
    gw: Gateway, ant: FakeAnthropic, fake_openai: FakeOpenAI
) -> None:
    msg = await gw.claude().messages.create(**sdk_args("native-first"))
    assert ant.seen[-1].body == asked("claude-fail")  # the first attempt: passed through
    assert fake_openai.seen[-1].path == "/v1/chat/completions"  # the fallback: translated
    assert fake_openai.seen[-1].body["model"] == "upstream-model"
    assert "top_k" not in fake_openai.seen[-1].body
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "".join(WORDS)  # type: ignore[union-attr]
    record = gw.settler.records[-1]
    assert record.status == 200 and record.attempts == 2 and record.provider == "fake"
    assert [a.status for a in record.attempt_log] == [500, 200]


async def test_output_guardrails_make_the_request_go_translated(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, ant: FakeAnthropic
) -> None:
    guardrails = {
        "policies": [{"name": "default", "detectors": [{"use": "secrets", "output": "redact"}]}]
    }
    gw = await start_gateway(config(fake_openai.url, ant.url, guardrails=guardrails))
    msg = await gw.claude().messages.create(**sdk_args("claude-thinking"))
    sent = ant.seen[-1].body
    assert "top_k" not in sent and "thinking" not in sent  # chat, translated to Anthropic's
    assert [b.type for b in msg.content] == ["text"]  # the thinking block does not survive chat
    assert msg.stop_sequence is None
    assert gw.settler.records[-1].usage.prompt_tokens == 1240


# -- Responses to OpenAI -----------------------------------------------------------


async def test_responses_go_to_openai_as_sent_with_reasoning_items_back(
    gw: Gateway, fake_openai: FakeOpenAI
) -> None:
    resp = await gw.sdk().responses.create(
        model="gpt-native", input="Say hello", max_output_tokens=500, reasoning={"effort": "low"}
    )
    seen = fake_openai.seen[-1]
    assert seen.path == "/v1/responses"
    assert seen.headers["Authorization"] == "Bearer sk-openai-secret"
    assert seen.body == {
        "model": "upstream-model",
        "input": "Say hello",
        "max_output_tokens": 500,
        "reasoning": {"effort": "low"},
        "store": False,  # the gateway keeps stored responses, never the shared upstream account
    }
    assert [item.type for item in resp.output] == ["reasoning", "message"]
    assert resp.output_text == "".join(TEXT) and resp.id == "resp_upstream123"
    record = gw.settler.records[-1]
    assert record.api == "responses" and record.status == 200
    assert (record.usage.prompt_tokens, record.usage.completion_tokens) == (1200, 30)
    assert record.usage.details == {"cached_tokens": 1024, "reasoning_tokens": 12}


async def test_a_responses_stream_passes_through(gw: Gateway, fake_openai: FakeOpenAI) -> None:
    stream = await gw.sdk().responses.create(model="gpt-native", input="Say hello", stream=True)
    events = [event async for event in stream]
    assert fake_openai.seen[-1].path == "/v1/responses"
    assert fake_openai.seen[-1].body["stream"] is True
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.completed"
    assert events[-1].response.output[0].type == "reasoning"  # type: ignore[union-attr]
    assert events[-1].response.output[0].summary[0].text == REASONING  # type: ignore[union-attr]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "".join(TEXT)
    record = gw.settler.records[-1]
    assert (record.usage.prompt_tokens, record.usage.completion_tokens) == (1200, 30)
    assert record.usage.details == {"cached_tokens": 1024, "reasoning_tokens": 12}


async def test_a_cut_responses_stream_ends_with_an_error_event_and_bills_the_text(
    gw: Gateway,
) -> None:
    async with aiohttp.ClientSession() as http:
        body = {"model": "gpt-cut", "input": "Say hello", "stream": True}
        async with http.post(f"{gw.url}/v1/responses", json=body) as resp:
            raw = await resp.read()
    events = parse_events(raw)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-2]["type"] == "response.output_text.delta"
    assert events[-1]["type"] == "error"
    record = gw.settler.records[-1]
    assert record.status == 502
    assert record.usage.source == "estimated"
    assert record.usage.completion_tokens == tokens.count_text(TEXT[0], "cut")


async def test_a_responses_stream_that_fails_is_recorded_as_failed(gw: Gateway) -> None:
    stream = await gw.sdk().responses.create(model="gpt-failed", input="Say hello", stream=True)
    events = [event async for event in stream]
    assert events[-1].type == "response.failed"  # passed through as OpenAI sent it
    assert events[-1].response.error.code == "server_error"  # type: ignore[union-attr]
    record = gw.settler.records[-1]
    # As a chat stream broken by the provider's error: not a 200 in the usage row.
    assert (record.status, record.error_code) == (502, "upstream_stream_broken")
    assert record.usage.source == "estimated"
    assert record.usage.completion_tokens == tokens.count_text(TEXT[0], "failed")


async def test_responses_to_a_server_without_the_api_are_translated(
    gw: Gateway, fake_openai: FakeOpenAI
) -> None:
    resp = await gw.sdk().responses.create(model="fake-model", input="Say hello")
    assert fake_openai.seen[-1].path == "/v1/chat/completions"
    assert [item.type for item in resp.output] == ["message"]
    assert resp.output_text == "".join(WORDS)


# -- with keys, tiers and the database ------------------------------------------------

ROWS = f"SELECT e.endpoint, e.prompt_tokens, e.completion_tokens, e.details {OF_TENANT}"


async def test_the_tier_cap_applies_and_usage_rows_and_stored_responses_are_kept(
    start_keyed: StartKeyed,
    fake_openai: FakeOpenAI,
    ant: FakeAnthropic,
    pg: asyncpg.Pool,
) -> None:
    base = billing_config(fake_openai.url)
    cfg = config(fake_openai.url, ant.url, base)
    keyed = await start_keyed(cfg)  # max_tokens 4096
    sdk = keyed.claude()
    await sdk.messages.create(**{**sdk_args("claude-thinking"), "max_tokens": 8000})
    assert ant.seen[-1].body["max_tokens"] == 4096  # the tier's cap, in Messages' own name
    openai_sdk = keyed.sdk()
    resp = await openai_sdk.responses.create(model="gpt-native", input="Say hello")
    assert fake_openai.seen[-1].body["max_output_tokens"] == 4096  # none asked: the cap
    kept = await openai_sdk.responses.retrieve(resp.id)  # stored here, not upstream
    assert kept.output_text == resp.output_text and kept.output[0].type == "reasoning"
    await wait_for(pg, USAGE_COUNT, keyed.tenant, expect=2)
    rows = [dict(r) for r in await pg.fetch(ROWS + " ORDER BY e.endpoint", keyed.tenant)]
    for row in rows:
        row["details"] = orjson.loads(row["details"])
    assert rows == [
        {"endpoint": "messages", "prompt_tokens": 1240, "completion_tokens": 25, "details": CACHE},
        {
            "endpoint": "responses",
            "prompt_tokens": 1200,
            "completion_tokens": 30,
            "details": {"cached_tokens": 1024, "reasoning_tokens": 12},
        },
    ]


# -- the pieces ----------------------------------------------------------------------


def test_the_native_body_carries_the_capped_limit_under_the_apis_own_name() -> None:
    door = MessagesDoor("req_1")
    door.to_chat(asked("claude-x"))
    assert door.native_body("claude-real", 100) == {**asked("claude-real"), "max_tokens": 100}
    assert door.native_body("claude-real", None) == asked("claude-real")
    responses = ResponsesDoor("req_2")
    responses.to_chat({"model": "m", "input": "hi", "max_output_tokens": 900})
    body = responses.native_body("gpt-real", 64)
    assert body == {"model": "gpt-real", "input": "hi", "max_output_tokens": 64, "store": False}


def provider(**fields: Any) -> dict[str, Any]:
    return {
        "providers": {"p": fields},
        "models": [{"name": "m", "targets": [{"provider": "p"}]}],
    }


def test_responses_is_on_for_openai_itself_only_unless_configured() -> None:
    def responses(**fields: Any) -> bool:
        return parse_config(orjson.dumps(provider(**fields)).decode()).providers["p"].responses

    assert responses(kind="openai", base_url="https://api.openai.com/v1")
    assert not responses(kind="openai", base_url="https://api.groq.com/openai/v1")
    assert responses(kind="openai", base_url="http://127.0.0.1:8000/v1", responses=True)
    assert not responses(kind="openai", base_url="https://api.openai.com/v1", responses=False)
    with pytest.raises(Exception, match="responses"):
        responses(kind="anthropic", base_url="https://api.anthropic.com", responses=True)
