"""Traces: the span tree a real OTLP/HTTP receiver gets, and nothing when off.

The gateway is the real app; providers are the fault-injecting fakes of
``test_forward``; the collector is ``OtlpReceiver``, which decodes the
exporter's protobuf with ``opentelemetry-proto``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import yaml

from proxy.config.reader import ConfigError
from proxy.core.trace import NO_TRACER
from proxy.pipeline.registry import parse_config
from proxy.stages.trace.stage import TracingStage
from proxy.web.keys import CONFIG, STAGES
from tests.billing_helpers import billing_config, tenant_with_key
from tests.conftest import Gateway, StartGateway, gateway_config
from tests.fakes import FAKE_USAGE, FakeOpenAI
from tests.fakes_faults import FaultyOpenAI
from tests.otlp_receiver import Got, OtlpReceiver
from tests.waiting import until

MSG = [{"role": "user", "content": "the secret prompt"}]
TIMEOUTS = {"connect": 0.5, "first_byte": 0.5, "idle": 0.5, "total": 3}
RETRY = {"max_attempts": 3, "backoff_base_ms": 5, "backoff_max_ms": 20, "deadline_s": 3}
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    r = await OtlpReceiver().start()
    yield r
    await r.close()


def config(a: FaultyOpenAI, b: FaultyOpenAI, **kw: Any) -> dict[str, Any]:
    def provider(url: str) -> dict[str, Any]:
        return {"kind": "openai", "base_url": url, "api_key": "sk-secret", "timeouts": TIMEOUTS}

    cfg: dict[str, Any] = {
        "auth": "none",
        "retry": RETRY,
        "providers": {"a": provider(a.url), "b": provider(b.url)},
        "models": [
            # Both of a's targets fail (one retry), then the fallback on b answers.
            {
                "name": "flaky",
                "targets": [
                    {"provider": "a", "model": "error-500", "weight": 1000},
                    {"provider": "a", "model": "error-502", "weight": 1},
                ],
                "fallbacks": ["backup"],
            },
            {"name": "backup", "targets": [{"provider": "b", "model": "plain"}]},
        ],
    }
    cfg.update(kw)
    return cfg


def tracing(receiver: OtlpReceiver, **kw: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "endpoint": receiver.url,
        "sample_ratio": 1.0,
        "flush_interval_s": 0.05,
        "service_name": "tollway-test",
        **kw,
    }


async def chat(
    gw: Gateway, model: str, headers: dict[str, str] | None = None, **body: Any
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.base_url + "/chat/completions",
            json={"model": model, "messages": MSG, **body},
            headers=headers or {},
        ) as r,
    ):
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


def trace_of(traceparent: str) -> tuple[str, str]:
    version, trace_id, span_id, _flags = traceparent.split("-")
    assert version == "00" and len(trace_id) == 32 and len(span_id) == 16
    return trace_id, span_id


def sampled(traceparent: str) -> bool:
    return bool(int(traceparent.rsplit("-", 1)[1], 16) & 1)


async def root_of(receiver: OtlpReceiver, trace_id: str) -> Got:
    """The request's root span, once the receiver has it (it ends last)."""

    def root() -> Got | None:
        return next((s for s in receiver.trace(trace_id) if s.kind == 2), None)  # SERVER

    await until(root, limit=10, what="the request's root span exported")
    found = root()
    assert found is not None
    return found


async def test_retry_and_fallback_span_tree(
    receiver: OtlpReceiver,
    start_gateway: StartGateway,
    fake_a: FaultyOpenAI,
    fake_b: FaultyOpenAI,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = {"enabled": True, "deterministic_only": False}
    cfg = config(fake_a, fake_b, tracing=tracing(receiver), cache=cache)
    gw = await start_gateway(cfg, redis_url=redis_url)
    given = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"
    with caplog.at_level(logging.INFO, logger="tollway.access"):
        status, headers, _ = await chat(gw, "flaky", {"traceparent": given})
    assert status == 200 and headers["x-tollway-attempts"] == "3"
    # traceparent in: the same trace out, to the client and in the access log.
    trace_id, root_id = trace_of(headers["traceparent"])
    assert trace_id == CLIENT_TRACE
    line = orjson.loads(next(r.getMessage() for r in caplog.records if "flaky" in r.getMessage()))
    assert line["trace_id"] == CLIENT_TRACE

    root = await root_of(receiver, trace_id)
    assert (root.name, root.span_id, root.parent_id) == ("chat", root_id, CLIENT_PARENT)
    assert root.service == "tollway-test"
    assert root.attributes["gen_ai.operation.name"] == "chat"
    assert root.attributes["gen_ai.system"] == "openai"
    assert root.attributes["gen_ai.request.model"] == "flaky"
    assert root.attributes["gen_ai.response.model"] == "plain"
    assert root.attributes["gen_ai.usage.input_tokens"] == FAKE_USAGE["prompt_tokens"]
    assert root.attributes["gen_ai.usage.output_tokens"] == FAKE_USAGE["completion_tokens"]
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["tollway.cache"] == "miss" and not root.error

    await until(lambda: len(receiver.trace(trace_id)) >= 7, what="every span of the request")
    children = [s for s in receiver.trace(trace_id) if s.parent_id == root_id]
    names = sorted(s.name for s in children)
    assert names == sorted(
        ["admission", "cache", "chat error-500", "chat error-502", "chat plain", "settle"]
    )
    attempts = sorted(
        (s for s in children if s.kind == 3),  # CLIENT
        key=lambda s: s.attributes["tollway.retry"],
    )
    seen = [
        (
            s.attributes["tollway.provider"],
            s.attributes["gen_ai.request.model"],
            s.attributes["http.response.status_code"],
            s.attributes["tollway.retry"],
            s.attributes["tollway.breaker"],
            s.error,
        )
        for s in attempts
    ]
    assert {x[1] for x in seen[:2]} == {"error-500", "error-502"}  # weighted order
    assert [(p, st, n, b, e) for p, _, st, n, b, e in seen[:2]] in (
        [("a", 500, 0, "closed", True), ("a", 502, 1, "closed", True)],
        [("a", 502, 0, "closed", True), ("a", 500, 1, "closed", True)],
    )
    assert seen[2] == ("b", "plain", 200, 2, "closed", False)
    assert all(s.attributes["gen_ai.system"] == "openai" for s in attempts)

    # Each provider got its own attempt's span as the parent.
    sent = [trace_of(x.headers["traceparent"]) for x in (*fake_a.seen, *fake_b.seen)]
    assert sorted(sent) == sorted((trace_id, s.span_id) for s in attempts)

    # Never a prompt or a key in a span.
    dump = repr(receiver.spans)
    assert "secret prompt" not in dump and "sk-secret" not in dump


async def test_stream_has_first_token_event_and_new_trace(
    receiver: OtlpReceiver,
    start_gateway: StartGateway,
    fake_a: FaultyOpenAI,
    fake_b: FaultyOpenAI,
) -> None:
    gw = await start_gateway(config(fake_a, fake_b, tracing=tracing(receiver, propagate=False)))
    status, headers, _ = await chat(gw, "backup", stream=True)
    assert status == 200
    trace_id, root_id = trace_of(headers["traceparent"])  # a new trace, sampled
    assert trace_id != CLIENT_TRACE and sampled(headers["traceparent"])
    root = await root_of(receiver, trace_id)
    assert root.parent_id == "" and root.span_id == root_id
    (name, attrs), *_ = root.events
    assert name == "gen_ai.first_token" and 0 < attrs["gen_ai.server.time_to_first_token"] < 5
    assert "traceparent" not in fake_b.seen[-1].headers  # propagate: false


async def test_errors_carry_the_traceparent_and_are_traced(
    receiver: OtlpReceiver,
    start_gateway: StartGateway,
    fake_a: FaultyOpenAI,
    fake_b: FaultyOpenAI,
) -> None:
    gw = await start_gateway(config(fake_a, fake_b, tracing=tracing(receiver)))
    status, headers, _ = await chat(gw, "no-such-model")
    assert status == 404
    trace_id, _ = trace_of(headers["traceparent"])
    root = await root_of(receiver, trace_id)
    assert root.attributes["http.response.status_code"] == 404
    assert root.attributes["error.type"] == "model_not_found"


async def test_unsampled_trace_keeps_its_id_and_exports_nothing(
    receiver: OtlpReceiver,
    start_gateway: StartGateway,
    fake_a: FaultyOpenAI,
    fake_b: FaultyOpenAI,
) -> None:
    gw = await start_gateway(config(fake_a, fake_b, tracing=tracing(receiver, sample_ratio=0)))
    status, headers, _ = await chat(gw, "backup")
    assert status == 200 and not sampled(headers["traceparent"])
    unsampled = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-00"
    status, headers, _ = await chat(gw, "backup", {"traceparent": unsampled})
    assert trace_of(headers["traceparent"])[0] == CLIENT_TRACE
    assert trace_of(fake_b.seen[-1].headers["traceparent"])[0] == CLIENT_TRACE
    stage = next(s for s in gw.app[STAGES] if isinstance(s, TracingStage))
    await stage.close()  # a final flush: whatever was to be exported is sent now
    assert receiver.spans == []


async def test_unsampled_without_propagation_sends_providers_nothing(
    receiver: OtlpReceiver,
    start_gateway: StartGateway,
    fake_a: FaultyOpenAI,
    fake_b: FaultyOpenAI,
) -> None:
    cfg = tracing(receiver, sample_ratio=0, propagate=False)
    gw = await start_gateway(config(fake_a, fake_b, tracing=cfg))
    status, headers, _ = await chat(gw, "backup")
    assert status == 200 and not sampled(headers["traceparent"])
    assert "traceparent" not in fake_b.seen[-1].headers
    unsampled = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-00"
    status, headers, _ = await chat(gw, "backup", {"traceparent": unsampled})
    assert trace_of(headers["traceparent"])[0] == CLIENT_TRACE
    assert "traceparent" not in fake_b.seen[-1].headers


async def test_off_means_no_tracer_no_header_no_spans(
    receiver: OtlpReceiver,
    start_gateway: StartGateway,
    fake_a: FaultyOpenAI,
    fake_b: FaultyOpenAI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    off = {"enabled": False, "endpoint": receiver.url}
    for cfg in (config(fake_a, fake_b), config(fake_a, fake_b, tracing=off)):
        gw = await start_gateway(cfg)
        assert gw.app[CONFIG].current.tracer is NO_TRACER
        given = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"
        with caplog.at_level(logging.INFO, logger="tollway.access"):
            status, headers, _ = await chat(gw, "backup", {"traceparent": given})
        assert status == 200 and "traceparent" not in headers
        assert "traceparent" not in fake_b.seen[-1].headers
        assert "trace_id" not in orjson.loads(caplog.records[-1].getMessage())
        stage = next(s for s in gw.app[STAGES] if isinstance(s, TracingStage))
        assert stage._tracers == {}  # no SDK provider, no exporter was built
    assert receiver.posts == 0


async def test_keys_get_an_auth_span_and_a_refusal_is_traced(
    receiver: OtlpReceiver,
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    pg: asyncpg.Pool,
    pg_url: str,
    tmp_path: Path,
) -> None:
    cfg = {**billing_config(fake_openai.url), "tracing": tracing(receiver)}
    tenant, key = await tenant_with_key(pg, tmp_path, "pro")
    gw = await start_gateway(cfg, database_url=pg_url, data_dir=tmp_path)
    status, headers, _ = await chat(gw, "fake-model", {"Authorization": f"Bearer {key['api_key']}"})
    assert status == 200
    trace_id, root_id = trace_of(headers["traceparent"])
    root = await root_of(receiver, trace_id)
    assert root.attributes["tollway.tenant"] == tenant
    await until(lambda: len(receiver.trace(trace_id)) >= 4, what="auth, admission, attempt, settle")
    names = {s.name for s in receiver.trace(trace_id) if s.parent_id == root_id}
    assert {"auth", "admission", "chat upstream-model", "settle"} <= names

    status, headers, _ = await chat(gw, "fake-model", {"Authorization": "Bearer sk-wrong"})
    assert status == 401
    refused = await root_of(receiver, trace_of(headers["traceparent"])[0])
    assert refused.attributes["http.response.status_code"] == 401
    (auth,) = [s for s in receiver.trace(refused.trace_id) if s.name == "auth"]
    assert auth.error and auth.attributes["error.type"] == "InvalidApiKey"
    assert key["api_key"] not in repr(receiver.spans) and "sk-wrong" not in repr(receiver.spans)


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ({"enabled": True, "sample_ratio": 1.5}, "tracing.sample_ratio: must be between 0 and 1"),
        ({"enabled": True, "endpoint": "grpc://x:4317"}, "tracing.endpoint: must be an http"),
        ({"enabled": True, "sampling": 1}, "tracing.sampling: unknown key"),
        ({"enabled": "yes"}, "tracing.enabled: must be true or false"),
    ],
)
def test_tracing_section_is_strict(section: dict[str, Any], error: str) -> None:
    text = yaml.safe_dump({**gateway_config("http://127.0.0.1:9"), "tracing": section})
    with pytest.raises(ConfigError, match=re.escape(error)):
        parse_config(text, {})


async def test_a_malformed_traceparent_starts_a_new_trace_at_the_ratio(
    receiver: OtlpReceiver,
    start_gateway: StartGateway,
    fake_a: FaultyOpenAI,
    fake_b: FaultyOpenAI,
) -> None:
    """Sampling is decided before the SDK (``UnsampledSpan`` for the rest):
    a traceparent that does not parse is no decision, so the ratio decides,
    with 1.0 a recorded new trace, with 0 an unsampled one whose attempts
    still get their own span ids."""
    bad = {"traceparent": "00-not-a-trace-01"}
    gw = await start_gateway(config(fake_a, fake_b, tracing=tracing(receiver, sample_ratio=1.0)))
    status, headers, _ = await chat(gw, "backup", bad)
    assert status == 200 and sampled(headers["traceparent"])
    await root_of(receiver, trace_of(headers["traceparent"])[0])

    quiet = await start_gateway(config(fake_a, fake_b, tracing=tracing(receiver, sample_ratio=0)))
    status, headers, _ = await chat(quiet, "backup", bad)
    assert status == 200 and not sampled(headers["traceparent"])
    trace_id, span_id = trace_of(headers["traceparent"])
    upstream = fake_b.seen[-1].headers["traceparent"]
    assert trace_of(upstream)[0] == trace_id and trace_of(upstream)[1] != span_id
    assert not sampled(upstream)
