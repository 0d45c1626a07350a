"""The tracing stage: owns ``tracing:`` and lends each snapshot its tracer.

It has no per-request hook: the spans wrap the pipeline's own steps (the
gate's key check, admission, each plug-in stage, each upstream attempt,
settle), which the pipeline opens through ``proxy.core.trace``. A snapshot
whose config has no ``tracing:`` gets the no-op tracer, so a gateway with
tracing off builds no OpenTelemetry object at all.

One ``OtelTracer`` per distinct settings: a reload that leaves the section
as it was keeps the tracer (and its export thread); one that changes it
gets a new one, and the old ones are shut down (flushed) with the app.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from proxy.config.model import Config
from proxy.core.trace import Tracer
from proxy.stages.base import Stage
from proxy.stages.trace.config import TraceSettings, parse_tracing

if TYPE_CHECKING:
    from proxy.stages.trace.otel import OtelTracer


class TracingStage(Stage):
    name = "tracing"
    section = "tracing"

    def __init__(self) -> None:
        self._tracers: dict[TraceSettings, OtelTracer] = {}

    @classmethod
    def configure(cls, raw: Any, config: Config) -> TraceSettings | None:
        return parse_tracing(raw)

    def tracer(self, settings: TraceSettings) -> Tracer:
        found = self._tracers.get(settings)
        if found is None:
            # Imported here: a gateway without tracing never loads the SDK.
            from proxy.stages.trace.otel import OtelTracer

            found = self._tracers[settings] = OtelTracer(settings)
        return found

    async def close(self) -> None:
        for tracer in self._tracers.values():
            await asyncio.to_thread(tracer.shutdown)  # a last export: not on the loop
        self._tracers.clear()
