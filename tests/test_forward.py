"""Retries, fallbacks, timeouts and circuit breaking against faulty providers.

Two fault-injecting fakes on real ports play providers ``a`` and ``b``; the
gateway is the real app. Timeouts and backoffs are tenths of a second so the
whole file runs in a few seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy.stages.route import Router
from proxy.web.keys import CONFIG, UPSTREAMS
from tests.conftest import Gateway, StartGateway
from tests.fakes import WORDS
from tests.fakes_faults import FaultyOpenAI
from tests.waiting import until

MSG = [{"role": "user", "content": "hi"}]
TIMEOUTS = {"connect": 0.5, "first_byte": 0.3, "idle": 0.3, "total": 3}
RETRY = {"max_attempts": 3, "backoff_base_ms": 5, "backoff_max_ms": 20, "deadline_s": 2}


async def started(start: StartGateway, cfg: dict[str, Any]) -> Gateway:
    """The gateway with its router seeded, so weighted draws repeat run to run."""
    gw = await start(cfg)
    store = gw.app[CONFIG]
    router = Router(store.current.config, rng=random.Random(5))
    store.swap(dataclasses.replace(store.current, router=router))
    return gw


def config(a: FaultyOpenAI, b: FaultyOpenAI, **kw: Any) -> dict[str, Any]:
    def provider(url: str) -> dict[str, Any]:
        return {"kind": "openai", "base_url": url, "api_key": "sk-secret", "timeouts": TIMEOUTS}

    cfg: dict[str, Any] = {
        "auth": "none",
        "retry": RETRY,
        "providers": {"a": provider(a.url), "b": provider(b.url)},
        "models": [
            {"name": "fake-*", "targets": [{"provider": "a"}]},
            # a is drawn first 1000 times in 1001, so a fault on a is met at once.
            {
                "name": "pair",
                "targets": [
                    {"provider": "a", "model": "plain", "weight": 1000},
                    {"provider": "b", "model": "plain", "weight": 1},
                ],
            },
            {
                "name": "primary",
                "targets": [{"provider": "a", "model": "error-500"}],
                "fallbacks": ["backup"],
            },
            {"name": "backup", "targets": [{"provider": "b", "model": "plain"}]},
        ],
    }
    cfg.update(kw)
    return cfg


async def _chat(gw: Gateway, model: str, **body: Any) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.base_url + "/chat/completions", json={"model": model, "messages": MSG, **body}
        ) as r,
    ):
        raw = await r.read()
        headers = {k.lower(): v for k, v in r.headers.items()}
        if body.get("stream") and r.status == 200:
            events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e]
            return r.status, headers, events
        return r.status, headers, orjson.loads(raw)


def _stream_text(events: list[bytes]) -> str:
    chunks = [orjson.loads(e) for e in events if e != b"[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


# --- retries on one target -------------------------------------------------


async def test_500_then_success_is_retried(
    start_gateway: StartGateway, fake_a: FaultyOpenAI, fake_b: FaultyOpenAI
) -> None:
    gw = await start_gateway(config(fake_a, fake_b))
    raw = await gw.sdk().chat.completions.with_raw_response.create(
        model="fake-error-500-once", messages=MSG
    )
    assert raw.parse().choices[0].message.content == "".join(WORDS)
    assert raw.headers["x-tollway-attempts"] == "2"
    assert raw.headers["x-tollway-provider"] == "a"
    assert raw.headers["x-tollway-model"] == "fake-error-500-once"
    assert len(fake_a.seen) == 2
    record = gw.settler.records[-1]
    assert record.attempts == 2 and record.status == 200
    assert [(a.provider, a.status) for a in record.attempt_log] == [("a", 500), ("a", 200)]


async def test_429_retry_after_is_honoured(
    start_gateway: StartGateway, fake_a: FaultyOpenAI, fake_b: FaultyOpenAI
) -> None:
    fake_a.retry_after_ms = 300
    gw = await start_gateway(config(fake_a, fake_b))
    started = time.monotonic()
    status, headers, _ = await _chat(gw, "fake-ratelimit-once")
    assert status == 200 and headers["x-tollway-attempts"] == "2"
    assert time.monotonic() - started >= 0.3  # waited as asked, not just the 5 ms backoff


async def test_retry_after_beyond_deadline_passes_the_429_on(
    start_gateway: StartGateway, fake_a: FaultyOpenAI, fake_b: FaultyOpenAI
) -> None:
    gw = await start_gateway(config(fake_a, fake_b))
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as exc:
        await gw.sdk().chat.completions.create(model="fake-error-429", messages=MSG)
    assert time.monotonic() - started < 3  # retry-after: 7 is beyond the 2 s deadline
    assert exc.value.response.headers["retry-after"] == "7"
    assert exc.value.response.headers["x-tollway-attempts"] == "1"
    assert len(fake_a.seen) == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_reset_before_first_byte_is_retried(
    start_gateway: StartGateway, fake_a: FaultyOpenAI, fake_b: FaultyOpenAI, stream: bool
) -> None:
    gw = await start_gateway(config(fake_a, fake_b))
    status, headers, body = await _chat(gw, "fake-reset-once", stream=stream)
    assert status == 200 and headers["x-tollway-attempts"] == "2"
    if stream:
        assert _stream_text(body) == "".join(WORDS) and body[-1] == b"[DONE]"
    first = gw.settler.records[-1].attempt_log[0]
    assert (first.status, first.error_code, first.reached) == (502, "upstream_unavailable", True)


@pytest.mark.parametrize(
    ("model", "stream"),
    [
        ("fake-stall-first-byte-once", False),
        ("fake-stall-first-byte-once", True),
        ("fake-stall-first-event-once", True),  # 200 and headers, then silence
    ],
)
async def test_stall_before_first_byte_moves_on(
    start_gateway: StartGateway,
    fake_a: FaultyOpenAI,
    fake_b: FaultyOpenAI,
    model: str,
    stream: bool,
) -> None:
    gw = await start_gateway(config(fake_a, fake_b))
    started = time.monotonic()
    status, headers, body = await _chat(gw, model, stream=stream)
    assert status == 200 and headers["x-tollway-attempts"] == "2"
    assert 0.3 <= time.monotonic() - started < 1.5  # one first_byte timeout, then an answer
    if stream:
        assert _stream_text(body) == "".join(WORDS)
    assert gw.settler.records[-1].attempt_log[0].status == 504


# --- after the first byte: never retried -----------------------------------


@pytest.mark.parametrize(
    ("model", "code"),
    [
        ("fake-held", "upstream_timeout"),  # stalls mid-stream: the idle gap is 0.3 s
        ("fake-cut", "upstream_stream_broken"),  # connection dropped mid-stream
        ("fake-truncated", "upstream_stream_broken"),  # clean end, but no [DONE]
    ],
)
async def test_failure_after_first_byte_ends_the_stream_and_is_not_retried(
    start_gateway: StartGateway, fake_a: FaultyOpenAI, fake_b: FaultyOpenAI, model: str, code: str
) -> None:
    cfg = config(fake_a, fake_b)
    # After the first byte only: a first byte later than 0.3 s (a loaded
    # machine's stall, seen in CI) is a legitimate retry, not this test's case.
    for provider in cfg["providers"].values():
        provider["timeouts"] = {**TIMEOUTS, "first_byte": 2.0, "total": 5}
    gw = await start_gateway(cfg)
    async with asyncio.timeout(6):
        status, headers, events = await _chat(gw, model, stream=True)
    assert status == 200 and headers["x-tollway-attempts"] == "1"
    payloads = [orjson.loads(e) for e in events]  # every event whole JSON
    assert payloads[-1]["error"]["code"] == code
    assert len(fake_a.seen) == 1  # the provider saw exactly one request
    record = gw.settler.records[-1]
    assert record.attempts == 1 and record.status in (502, 504)


async def test_broken_stream_does_not_fall_back_to_another_model(
    start_gateway: StartGateway, fake_a: FaultyOpenAI, fake_b: FaultyOpenAI
) -> None:
    cfg = config(fake_a, fake_b)
    cfg["models"][2]["targets"] = [{"provider": "a", "model": "cut"}]
    gw = await start_gateway(cfg)
    status, _, events = await _chat(gw, "primary", stream=True)
    assert status == 200 and b"upstream_stream_broken" in events[-1]
    assert len(fake_a.seen) == 1 and fake_b.seen == []


async def test_slow_drip_within_the_idle_gap_completes(
    start_gateway: StartGateway, fake_a: FaultyOpenAI, fake_b: FaultyOpenAI
) -> None:
    fake_a.drip_s = 0.1  # 10 events: the stream takes ~1 s, each gap 0.1 s < idle 0.3 s
    gw = await start_gateway(config(fake_a, fake_b))
    started = time.monotonic()
    status, _, events = await _chat(gw, "fake-drip", stream=True)
    assert status == 200 and time.monotonic() - started > 0.6
    assert _stream_text(events) == "".join(WORDS) and events[-1] == b"[DONE]"


async def test_total_timeout_bounds_a_dripping_stream(
    start_gateway: StartGateway, fake_a: FaultyOpenAI, fake_b: FaultyOpenAI
) -> None:
    fake_a.drip_s = 0.1
    cfg = config(fake_a, fake_b)
    cfg["providers"]["a"]["timeouts"] = {**TIMEOUTS, "total": 0.45}
    gw = await start_gateway(cfg)
    status, _, events = await _chat(gw, "fake-drip", stream=True)
    error = orjson.loads(events[-1])["error"]
    assert status == 200 and error["code"] == "upstream_timeout"
    assert "total time" in error["message"] and len(fake_a.seen) == 1


@pytest.mark.parametrize(
    ("model", "stream"),
    [("fake-late", False), ("fake-late", True), ("fake-late-first-event", True)],
)
async def test_first_byte_is_not_capped_by_idle(
    start_gateway: StartGateway,
    fake_a: FaultyOpenAI,
    fake_b: FaultyOpenAI,
    model: str,
    stream: bool,
) -> None:
    """Each timeout means what the README says, independently: an answer
    that starts after 0.8 s is within ``first_byte`` (1.5 s) although
    ``idle`` (the gap between chunks) is 0.3 s; after it, idle holds."""
    cfg = config(fake_a, fake_b, retry={**RETRY, "max_attempts": 1})
    cfg["providers"]["a"]["timeouts"] = {**TIMEOUTS, "first_byte": 1.5, "idle": 0.3}
    gw = await start_gateway(cfg)
    started = time.monotonic()
    status, _, body = await _chat(gw, model, stream=stream)
    assert status == 200, body
    assert 0.8 <= time.monotonic() - started < 1.5
    if stream:
        assert _stream_text(body) == "".join(WORDS) and body[-1] == b"[DONE]"
    else:
        assert body["choices"][0]["message"]["content"] == "".join(WORDS)
    # first_byte still bounds the start, and idle the gaps after it
    fake_a.late_s = 3.0
    started = time.monotonic()
    status, _, body = await _chat(gw, model, stream=stream)
    assert status == 504 and body["error"]["code"] == "upstream_timeout"
    assert 1.5 <= time.monotonic() - started < 2.5
    status, _, events = await _chat(gw, "fake-held", stream=True)
    assert status == 200 and orjson.loads(events[-1])["error"]["code"] == "upstream_timeout"


async def test_model_timeouts_override_the_providers(
    start_gateway: StartGateway, fake_a: FaultyOpenAI, fake_b: FaultyOpenAI
) -> None:
    cfg = config(fake_a, fake_b, retry={**RETRY, "max_attempts": 1})
    cfg["providers"]["a"]["timeouts"] = {**TIMEOUTS, "first_byte": 3}  # far from the model's
    cfg["models"][0]["timeouts"] = {"first_byte": 0.1}
    gw = await start_gateway(cfg)
    started = time.monotonic()
    status, _, body = await _chat(gw, "fake-stall-first-byte")
    assert status == 504 and time.monotonic() - started < 1.5
    assert "0.1" in body["error"]["message"]


# --- fallbacks ---------------------------------------------------------------


async def test_fallback_to_a_second_provider(
    start_gateway: StartGateway, fake_a: FaultyOpenAI, fake_b: FaultyOpenAI
) -> None:
    fake_a.force = "error-503"
    cfg = config(fake_a, fake_b)
    cfg["providers"]["a"]["breaker"] = {"failures": 100}
    gw = await started(start_gateway, cfg)
    results = [await _chat(gw, "pair") for _ in range(5)]
    assert all(status == 200 and h["x-tollway-provider"] == "b" for status, h, _ in results)
    fell_back = [h for _, h, _ in results if h["x-tollway-attempts"] == "2"]
    assert fell_back and len(fake_a.seen) == len(fell_back)  # a failed, b answered: no wait


async def test_fallback_to_a_second_model(
    start_gateway: StartGateway, fake_a: FaultyOpenAI, fake_b: FaultyOpenAI
) -> None:
    gw = await start_gateway(config(fake_a, fake_b))
    raw = await gw.sdk().chat.completions.with_raw_response.create(model="primary", messages=MSG)
    assert raw.headers["x-tollway-provider"] == "b"
    assert raw.headers["x-tollway-model"] == "plain"
    assert raw.headers["x-tollway-attempts"] == "2"
    record = gw.settler.records[-1]
    assert record.public_model == "primary"  # billed as what the client asked for
    assert [(a.provider, a.model, a.status) for a in record.attempt_log] == [
        ("a", "error-500", 500),
        ("b", "plain", 200),
    ]


async def test_other_4xx_is_neither_retried_nor_fallen_back(
    start_gateway: StartGateway, fake_a: FaultyOpenAI, fake_b: FaultyOpenAI
) -> None:
    cfg = config(fake_a, fake_b)
    cfg["models"][2]["targets"] = [{"provider": "a", "model": "error-400"}]
    gw = await start_gateway(cfg)
    status, headers, body = await _chat(gw, "primary")
    assert status == 400 and body["error"]["code"] == "fake_400"
    assert headers["x-tollway-attempts"] == "1"
    assert len(fake_a.seen) == 1 and fake_b.seen == []


# --- deadline and exhausted plans --------------------------------------------


async def test_deadline_bounds_total_time(
    start_gateway: StartGateway, fake_a: FaultyOpenAI, fake_b: FaultyOpenAI
) -> None:
    gw = await start_gateway(
        config(fake_a, fake_b, retry={**RETRY, "max_attempts": 10, "deadline_s": 0.5})
    )
    started = time.monotonic()
    status, headers, body = await _chat(gw, "fake-stall-first-byte")
    elapsed = time.monotonic() - started
    assert status == 504 and 0.5 <= elapsed < 1.5  # without the deadline: 10 x 0.3 s
    assert body["error"]["code"] == "upstream_timeout"
    assert "within 0.5s" in body["error"]["message"]
    assert headers["x-tollway-attempts"] == "2"  # 0.3 s, then the 0.2 s left


async def test_exhausted_plan_errors_name_no_urls_or_secrets(
    start_gateway: StartGateway, fake_a: FaultyOpenAI, fake_b: FaultyOpenAI
) -> None:
    cfg = config(fake_a, fake_b)
    cfg["providers"]["a"]["base_url"] = "http://127.0.0.1:9/v1"  # discard port: refused
    gw = await start_gateway(cfg)
    status, headers, body = await _chat(gw, "fake-anything")
    assert status == 502 and body["error"]["code"] == "upstream_unavailable"
    assert headers["x-tollway-attempts"] == "3" and headers["x-tollway-provider"] == "a"
    text = orjson.dumps(body).decode()
    assert "127.0.0.1" not in text and "sk-secret" not in text
    log = gw.settler.records[-1].attempt_log
    assert [a.reached for a in log] == [False, False, False]  # nothing a provider could bill

    status, headers, body = await _chat(gw, "primary")  # a refused, fallback b answered
    assert status == 200 and headers["x-tollway-provider"] == "b"


@pytest.mark.parametrize(
    ("fault", "status", "type_", "code"),
    [
        (500, 502, "upstream_error", "bad_gateway"),
        (503, 503, "server_error", "service_unavailable"),  # overloaded: come back later
    ],
)
async def test_all_5xx_ends_in_502_or_503(
    start_gateway: StartGateway,
    fake_a: FaultyOpenAI,
    fake_b: FaultyOpenAI,
    fault: int,
    status: int,
    type_: str,
    code: str,
) -> None:
    gw = await start_gateway(config(fake_a, fake_b))
    got, headers, body = await _chat(gw, f"fake-error-{fault}")
    assert got == status and headers["x-tollway-attempts"] == "3"
    assert body["error"] == {
        "message": f"provider 'a' failed with HTTP {fault} (3 attempts).",
        "type": type_,
        "param": None,
        "code": code,
    }


# --- circuit breaker -----------------------------------------------------------


async def _health(gw: Gateway, key: str) -> str:
    return (await gw.app[UPSTREAMS].breakers.health([key]))[key]


async def _is_half_open(gw: Gateway) -> bool:
    return await _health(gw, "a/plain") == "half_open"


async def test_breaker_opens_cools_down_half_opens_and_closes(
    start_gateway: StartGateway, fake_a: FaultyOpenAI, fake_b: FaultyOpenAI
) -> None:
    cfg = config(fake_a, fake_b)
    cfg["providers"]["a"]["breaker"] = {"failures": 2, "cooldown_s": 0.3, "max_cooldown_s": 5}
    gw = await started(start_gateway, cfg)
    fake_a.force = "error-500"
    for _ in range(5):  # two failures eject a; then b alone answers, first time
        status, headers, _ = await _chat(gw, "pair")
        assert status == 200 and headers["x-tollway-provider"] == "b"
    assert len(fake_a.seen) == 2
    assert await _health(gw, "a/plain") == "open"

    await until(lambda: _is_half_open(gw))  # cooled down (0.3 s): one probe may go
    probing = time.time()  # the breaker's clock is the wall clock
    assert (await _chat(gw, "pair"))[0] == 200
    assert len(fake_a.seen) == 3  # the probe failed: ejected again, for twice as long
    assert await _health(gw, "a/plain") == "open"
    await until(lambda: _is_half_open(gw))
    assert time.time() - probing >= 0.6  # the second cooldown is twice the first

    fake_a.force = None  # a recovered
    status, headers, _ = await _chat(gw, "pair")
    assert status == 200 and headers["x-tollway-provider"] == "a"  # the probe succeeded
    assert await _health(gw, "a/plain") == "closed"


async def test_last_healthy_target_is_never_ejected(
    start_gateway: StartGateway, fake_a: FaultyOpenAI, fake_b: FaultyOpenAI
) -> None:
    cfg = config(fake_a, fake_b, retry={**RETRY, "max_attempts": 1})
    cfg["providers"]["a"]["breaker"] = {"failures": 1}
    gw = await start_gateway(cfg)
    for _ in range(3):
        assert (await _chat(gw, "fake-error-500"))[0] == 502
    assert len(fake_a.seen) == 3  # every request still reached the only target
    assert await _health(gw, "a/fake-error-500") == "closed"


async def test_in_flight_stream_on_an_ejected_target_finishes(
    start_gateway: StartGateway, fake_a: FaultyOpenAI, fake_b: FaultyOpenAI
) -> None:
    cfg = config(fake_a, fake_b)
    cfg["providers"]["a"]["breaker"] = {"failures": 1, "cooldown_s": 60}
    gw = await start_gateway(cfg)
    body = {"model": "fake-held", "messages": MSG, "stream": True}
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base_url + "/chat/completions", json=body) as r,
    ):
        await r.content.readany()  # the first chunk is here
        breaker = gw.app[CONFIG].current.config.providers["a"].breaker
        await gw.app[UPSTREAMS].breakers.record("a/fake-held", breaker, "failure")
        assert await _health(gw, "a/fake-held") == "open"  # ejected mid-stream
        fake_a.release.set()
        rest = await r.read()
    assert rest.endswith(b"data: [DONE]\n\n")
    assert gw.settler.records[-1].status == 200
