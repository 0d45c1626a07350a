"""One batch line through the same pipeline as a client's request.

A line has a parsed body and a principal (the batch's creator key) but no
``web.Request``: it enters ``proxy.pipeline.run`` after the HTTP-only part
(reading the body, the gate's key check) and goes through route, admission
(quotas, key limits, budgets), the stages (guardrails, caches), forward with
its retries and fallbacks, and settle, like any request. It is never
streamed. Its usage row is keyed by ``event_id`` (the batch and the line's
``custom_id``), so a line run again after its worker died is billed once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import date
from typing import Any

from aiohttp import web

from proxy.core.principal import Principal
from proxy.core.record import UsageRecord
from proxy.pipeline.run import Settling, accept, name, proceed
from proxy.pipeline.runtime import Runtime
from proxy.providers.base import Endpoint
from proxy.stages.base import Exchange


@dataclass(frozen=True, slots=True)
class LineAnswer:
    status: int
    body: bytes


async def serve_line(
    rt: Runtime,
    endpoint: Endpoint,
    body: dict[str, Any],
    who: Principal,
    request_id: str,
    event_id: str,
    billed_in: date | None = None,
) -> LineAnswer:
    """The line's answer, or the ``GatewayError`` that refused it (its row
    is settled either way)."""
    snapshot = rt.config.current
    record = UsageRecord(request_id, endpoint, config=snapshot.config)
    ex = Exchange(None, record, snapshot.config, endpoint, body, time.perf_counter())
    ex.event_id, ex.billed_in = event_id, billed_in
    body["stream"] = False  # a batch's answer is a file line, never a stream
    body.pop("stream_options", None)
    async with Settling(rt, snapshot, ex):
        accept(ex, {})
        record.tags = {**(record.tags or {}), "tollway": "batch"}
        ex.who = who
        name(record, who)
        answer = await proceed(rt, snapshot, ex, {})
    if not isinstance(answer, web.Response) or not isinstance(answer.body, bytes):
        raise TypeError(f"a batch line got a {type(answer).__name__}, not a whole answer")
    return LineAnswer(answer.status, answer.body)
