"""A real OTLP/HTTP trace receiver for tests (never shipped).

An aiohttp server on 127.0.0.1 that accepts what an OpenTelemetry collector
accepts at ``/v1/traces`` (protobuf ``ExportTraceServiceRequest``), decodes
it with ``opentelemetry-proto`` and keeps every span as a plain ``Got``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.loopback import serve_app


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind is not None else None


@dataclass
class Got:
    """One span as the collector got it (ids in hex, as in a traceparent)."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    error: bool
    service: str

    @classmethod
    def of(cls, span: Span, service: str) -> Got:
        return cls(
            span.name,
            span.trace_id.hex(),
            span.span_id.hex(),
            span.parent_span_id.hex(),
            span.kind,
            {a.key: _value(a.value) for a in span.attributes},
            [(e.name, {a.key: _value(a.value) for a in e.attributes}) for e in span.events],
            span.status.code == span.status.STATUS_CODE_ERROR,
            service,
        )


@dataclass
class OtlpReceiver:
    spans: list[Got] = field(default_factory=list)
    posts: int = 0
    url: str = ""
    _runner: web.AppRunner | None = None

    async def _traces(self, request: web.Request) -> web.Response:
        assert request.headers["Content-Type"] == "application/x-protobuf"
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        self.posts += 1
        for rs in export.resource_spans:
            attrs = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                self.spans.extend(Got.of(s, attrs.get("service.name", "")) for s in ss.spans)
        body = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    async def start(self) -> OtlpReceiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner, url = await serve_app(app)
        self.url = url + "/v1/traces"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def trace(self, trace_id: str) -> list[Got]:
        return [s for s in self.spans if s.trace_id == trace_id]
