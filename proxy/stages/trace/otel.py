"""``proxy.core.trace`` on the OpenTelemetry SDK, exported over OTLP/HTTP.

Each ``OtelTracer`` owns its own ``TracerProvider`` (never the process-wide
global one: a test or an embedding app keeps its own) and a batch processor
whose thread sends protobuf to the collector, so the event loop never waits
on the export.

Sampling is decided before the SDK is asked: a new trace is sampled at
``sample_ratio``, and a client's ``traceparent`` keeps its own decision. A
request not sampled gets an ``UnsampledSpan``: its trace id and span ids for
the ``traceparent`` headers, and no SDK span at all. Non-recording SDK spans
for each step cost about a quarter of a pass-through request's instructions
(bench/RESULTS.md, "Tracing"), far more than the 1% that is recorded.

The attributes are OpenTelemetry's GenAI semantic conventions where one
exists (``gen_ai.*``), HTTP's for statuses, and ``tollway.*`` for the rest.
They come from the usage and attempt records only: names, statuses, token
counts; never a prompt, a completion or a key.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, MutableMapping
from types import TracebackType

from opentelemetry import trace as otel
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from proxy.core.record import AttemptRecord, UsageRecord
from proxy.core.trace import NoSpan
from proxy.stages.trace.config import TraceSettings

_PROPAGATOR = TraceContextTextMapPropagator()
# GenAI's gen_ai.operation.name per endpoint.
_OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}


class OtelTracer:
    def __init__(self, settings: TraceSettings) -> None:
        self.settings = settings
        self._ratio, self._propagate = settings.sample_ratio, settings.propagate
        # What reaches the SDK is sampled (``request`` decided); a sampled
        # client parent stays sampled through ParentBased's defaults.
        self.provider = TracerProvider(
            sampler=ParentBased(ALWAYS_ON),
            resource=Resource.create({"service.name": settings.service_name}),
        )
        exporter = OTLPSpanExporter(
            endpoint=settings.endpoint, headers=dict(settings.headers), timeout=10
        )
        delay_ms = settings.flush_interval_s * 1000
        self.provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=delay_ms)
        )
        self.tracer = self.provider.get_tracer("tollway")

    def request(self, endpoint: str, headers: Mapping[str, str]) -> OtelSpan | UnsampledSpan:
        if "traceparent" not in headers:  # a new trace: the common case, first
            if _random() >= self._ratio:
                return UnsampledSpan(self._propagate, _new_trace(), _new_id(64))
            context = None
        else:
            context = _PROPAGATOR.extract(headers)
            parent = otel.get_current_span(context).get_span_context()
            if not parent.is_valid:  # a new trace
                if _random() >= self._ratio:
                    return UnsampledSpan(self._propagate, _new_trace(), _new_id(64))
                context = None
            elif not parent.trace_flags.sampled:  # the client's decision
                trace = format(parent.trace_id, "032x")
                return UnsampledSpan(self._propagate, trace, _new_id(64))
        operation = _OPERATIONS.get(endpoint, endpoint)
        span = self.tracer.start_span(
            operation,
            context=context,
            kind=SpanKind.SERVER,
            attributes={"gen_ai.operation.name": operation},
        )
        return OtelSpan(self, span)

    def shutdown(self) -> None:
        """Send what is left and stop the export thread."""
        self.provider.shutdown()


class OtelSpan:
    __slots__ = ("_entry", "_span", "_tracer")

    def __init__(
        self, tracer: OtelTracer, span: otel.Span, entry: AttemptRecord | None = None
    ) -> None:
        self._tracer, self._span, self._entry = tracer, span, entry

    @property
    def trace_id(self) -> str:
        return format(self._span.get_span_context().trace_id, "032x")

    def child(self, name: str) -> OtelSpan:
        return OtelSpan(self._tracer, self._start(name, SpanKind.INTERNAL))

    def attempt(self, entry: AttemptRecord, system: str, retry: int, breaker: str) -> OtelSpan:
        span = self._start(f"{_operation(self._span)} {entry.model}", SpanKind.CLIENT)
        if span.is_recording():
            span.set_attributes(
                {
                    "gen_ai.system": system,
                    "gen_ai.request.model": entry.model,
                    "tollway.provider": entry.provider,
                    "tollway.retry": retry,
                    "tollway.breaker": breaker,
                }
            )
        return OtelSpan(self._tracer, span, entry)

    def _start(self, name: str, kind: SpanKind) -> otel.Span:
        context = otel.set_span_in_context(self._span)
        return self._tracer.tracer.start_span(name, context=context, kind=kind)

    def carrier(self) -> dict[str, str] | None:
        if not self._tracer.settings.propagate:
            return None
        return {"traceparent": self.traceparent()}

    def traceparent(self) -> str:
        ctx = self._span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    def stamp(self, headers: MutableMapping[str, str]) -> None:
        headers["traceparent"] = self.traceparent()

    def finish(self, record: UsageRecord) -> None:
        span = self._span
        if span.is_recording():
            span.set_attributes(_request_attributes(record))
            if record.ttft_ms is not None:
                # ttft and latency are both from the pipeline's start: the
                # first token came (latency - ttft) before now.
                ago_ns = int((record.latency_ms - record.ttft_ms) * 1e6)
                span.add_event(
                    "gen_ai.first_token",
                    {"gen_ai.server.time_to_first_token": record.ttft_ms / 1000},
                    timestamp=time.time_ns() - max(ago_ns, 0),
                )
            if record.status >= 500:
                span.set_status(Status(StatusCode.ERROR, record.error_code or str(record.status)))
        span.end()

    def end(self) -> None:
        entry = self._entry
        if entry is not None and self._span.is_recording():
            self._span.set_attribute("http.response.status_code", entry.status)
            if entry.error_code is not None:
                self._span.set_attribute("error.type", entry.error_code)
            if entry.status != 200:
                self._span.set_status(Status(StatusCode.ERROR, str(entry.status)))
        self._span.end()

    def __enter__(self) -> OtelSpan:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is not None and self._span.is_recording():
            # The type only: an exception's message may quote what a provider sent.
            self._span.set_attribute("error.type", kind.__name__)
            self._span.set_status(Status(StatusCode.ERROR, kind.__name__))
        self.end()


_random = random.random
_bits = random.getrandbits


def _new_id(bits: int) -> int:
    """A random trace (128 bits) or span (64 bits) id; never 0, which W3C forbids."""
    return _bits(bits) or 1


def _new_trace() -> str:
    """A new trace id, in the hex every use of an unsampled one wants."""
    return f"{_bits(128) or 1:032x}"


class UnsampledSpan(NoSpan):
    """A request that is not recorded: ids for its ``traceparent`` headers
    (flags 00, so providers and the client see it was not sampled), nothing
    else: an untraced request's span (its steps are itself, it records
    nothing) with ids. Each upstream attempt gets its own span id.

    Every request pays for it when tracing is on, so it keeps the trace id
    as the hex string the access log and the headers take (formatted once),
    and an attempt's span only when propagation sends it somewhere."""

    __slots__ = ("_propagate", "_span", "trace_id")
    trace_id: str  # always one, unlike an untraced request's

    def __init__(self, propagate: bool, trace: str, span: int) -> None:
        self._propagate, self.trace_id, self._span = propagate, trace, span

    def attempt(self, entry: AttemptRecord, system: str, retry: int, breaker: str) -> UnsampledSpan:
        if not self._propagate:
            return self  # no one sees its id
        return UnsampledSpan(True, self.trace_id, _new_id(64))

    def carrier(self) -> dict[str, str] | None:
        return {"traceparent": self.traceparent()} if self._propagate else None

    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self._span:016x}-00"

    def stamp(self, headers: MutableMapping[str, str]) -> None:
        headers["traceparent"] = self.traceparent()


def _operation(span: otel.Span) -> str:
    return str(getattr(span, "name", "chat")).split(" ")[0]


def _request_attributes(record: UsageRecord) -> dict[str, str | int | bool]:
    attrs: dict[str, str | int | bool] = {
        "http.response.status_code": record.status,
        "tollway.request_id": record.request_id,
        "tollway.attempts": record.attempts,
        "tollway.stream": record.stream,
    }
    optional = {
        "gen_ai.request.model": record.public_model,
        "gen_ai.response.model": record.provider_model,
        "gen_ai.system": _system(record),
        "tollway.provider": record.provider,
        "tollway.tenant": record.tenant,
        "tollway.cache": record.cache or None,
        "error.type": record.error_code,
    }
    attrs.update({k: v for k, v in optional.items() if v is not None})
    if record.usage.source != "none":
        attrs["gen_ai.usage.input_tokens"] = record.usage.prompt_tokens
        attrs["gen_ai.usage.output_tokens"] = record.usage.completion_tokens
    return attrs


def _system(record: UsageRecord) -> str | None:
    """The provider's kind (openai, anthropic, gemini...) as GenAI names systems."""
    if record.provider is None or record.config is None:
        return None
    provider = record.config.providers.get(record.provider)
    return provider.kind if provider is not None else None
