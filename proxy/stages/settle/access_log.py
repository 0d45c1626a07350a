"""One structured JSON line per request, on stdout (logger ``tollway.access``).

A settle-side observer: the line is built from the request's ``UsageRecord``
after it settled, so rejected, failed, cached and disconnected requests all
get theirs. It names the tenant and the key by its display prefix only.
Prompts and completions are left out unless the YAML names the tenant::

    logging:
      access_log: true            # default
      bodies:
        tenants: [acme-debug]     # globs; prompts and completions in their lines
        max_chars: 4000           # each text cut to this length

Every line passes the redaction layer (``proxy.core.redact``) like any log record.
``tollway serve`` writes the lines through a ``LineWriter`` (batched, off the
``logging`` machinery); without one (an app built in a test) they go to the
``tollway.access`` logger.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import orjson

from proxy.core import redact
from proxy.core.metering import StreamMeter
from proxy.core.pricing import cost_of
from proxy.core.record import UsageRecord
from proxy.providers.base import Reply
from proxy.stages.settle.line_writer import LineWriter

log = logging.getLogger("tollway.access")


def keep_bodies(
    record: UsageRecord,
    body: dict[str, Any],
    meter: StreamMeter | None,
    reply: Reply | None,
) -> None:
    """Attach the prompt and completion to ``record`` if its tenant's are logged."""
    policy = record.config.logging if record.config is not None else None
    if policy is None or not policy.logs_bodies(record.tenant):
        return
    cut = policy.body_max_chars
    prompt = body.get("messages", body.get("prompt", body.get("input")))
    completion = ""
    if meter is not None:
        completion = meter.delivered_text()
    elif reply is not None:
        completion = _reply_text(reply.body)
    record.transcript = {
        "prompt": orjson.dumps(prompt).decode()[:cut],
        "completion": completion[:cut],
    }


def _reply_text(raw: bytes) -> str:
    """The answer's text: a chat or completions answer's choices, or a
    front door's answer passed through in its own API (Anthropic's
    ``content`` blocks, a Responses ``output`` of messages)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(obj, dict):
        return ""
    parts: list[object] = []
    for choice in obj.get("choices") or ():
        if isinstance(choice, dict):
            msg = choice.get("message")
            parts.append(msg.get("content") if isinstance(msg, dict) else choice.get("text"))
    if obj.get("type") == "message":  # Anthropic's Messages
        parts += [b.get("text") for b in _dicts(obj.get("content")) if b.get("type") == "text"]
    if obj.get("object") == "response":  # OpenAI's Responses
        for item in _dicts(obj.get("output")):
            if item.get("type") == "message":
                content = _dicts(item.get("content"))
                parts += [c.get("text") for c in content if c.get("type") == "output_text"]
    return "".join(p for p in parts if isinstance(p, str))


def _dicts(value: object) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


class _Clock:
    """``datetime.now(UTC).isoformat(timespec="milliseconds")``, the second's
    part formatted once per second (the line's timestamp, ~1 µs less)."""

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second, self.prefix = -1, ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self.second:
            stamp = datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds")
            self.second, self.prefix = second, stamp[:-6]  # without "+00:00"
        return f"{self.prefix}.{int((now - second) * 1000):03d}+00:00"


_CLOCK = _Clock()


def line(record: UsageRecord, cost: float | None) -> bytes:
    usage = record.usage
    entry: dict[str, Any] = {
        "ts": _CLOCK.now(),
        "type": "access",
        "request_id": record.request_id,
        "tenant": record.tenant,
        "key_prefix": record.key_prefix,
        "endpoint": record.api,
        "model": record.public_model,
        "provider": record.provider,
        "provider_model": record.provider_model,
        "served_model": record.served_model,
        "stream": record.stream,
        "status": record.status,
        "error_code": record.error_code,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.details.get("cached_tokens", 0),
        "reasoning_tokens": usage.details.get("reasoning_tokens", 0),
        "usage_source": usage.source,
        "cost_usd": cost,
        "latency_ms": _ms(record.latency_ms),
        "ttft_ms": _ms(record.ttft_ms),
        "cache": record.cache or ("hit" if record.cached else None),
        "attempts": record.attempts,
        "upstream": [
            {"provider": a.provider, "status": a.status, "ms": _ms(a.latency_ms)}
            for a in record.attempt_log
        ],
        "client_disconnected": record.client_disconnected,
        "config_version": record.config.version if record.config is not None else None,
    }
    if record.trace_id is not None:
        entry["trace_id"] = record.trace_id
    if "guardrails" in record.extra:
        entry["guardrails"] = record.extra["guardrails"]
    if record.transcript is not None:
        entry.update(record.transcript)
    return orjson.dumps(entry)


def _clean(record: UsageRecord) -> bool:
    """Whether the line needs no scrubbing: every string it holds comes from
    the record's fields below (the rest is fixed keys, numbers and the
    gateway's own words, none of which holds a shape's trigger), and none of
    them holds a remembered secret or a shape's trigger, so ``scrub`` would
    return the line unchanged. JSON's escapes cannot make a trigger (none
    has a quote, a backslash or a control character). The key's display
    prefix holds the key shape's trigger on every billed line: the redactor
    knows it cannot match there (``redact.untouched``). A line with bodies or
    guardrail verdicts is always scrubbed."""
    if record.transcript is not None or "guardrails" in record.extra:
        return False
    strings = [
        record.request_id,
        record.tenant,
        record.api,
        record.public_model,
        record.provider,
        record.provider_model,
        record.served_model,
        record.error_code,
        record.usage.source,
        record.cache,
        record.trace_id,
        record.config.version if record.config is not None else None,
        *(a.provider for a in record.attempt_log),
    ]
    return redact.untouched("\x00".join(s for s in strings if s), record.key_prefix)


class AccessLog:
    """The observer: ``observe(record, cost)`` writes the line if enabled."""

    def __init__(self, writer: LineWriter | None = None) -> None:
        self.writer = writer

    def settle(self, record: UsageRecord) -> None:
        cost = cost_of(record)
        # null only when tokens were used and the served model has no price
        self.observe(record, None if cost is None else float(cost))

    def observe(self, record: UsageRecord, cost: float | None) -> None:
        policy = record.config.logging if record.config is not None else None
        if policy is not None and not policy.access_log:
            return
        if self.writer is not None:
            text = line(record, cost)
            self.writer.add(text if _clean(record) else redact.scrub_bytes(text))
        elif log.isEnabledFor(logging.INFO):
            log.info(line(record, cost).decode())
