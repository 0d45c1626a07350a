"""The YAML ``tracing:`` section (absent or ``enabled: false``: no traces at all).

::

    tracing:
      enabled: true
      endpoint: http://otel-collector:4318/v1/traces  # OTLP/HTTP (protobuf) traces URL
      sample_ratio: 0.01        # of new traces; a client's sampled traceparent is kept
      propagate: true           # send each attempt's traceparent to providers
      service_name: tollway
      headers: {}               # sent to the collector (an auth header: use ${ENV})
      flush_interval_s: 5       # how long finished spans wait to be sent in a batch
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.config.reader import ConfigError, Node


@dataclass(frozen=True, slots=True)
class TraceSettings:
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    sample_ratio: float = 1.0
    propagate: bool = True
    service_name: str = "tollway"
    headers: tuple[tuple[str, str], ...] = field(default=())
    flush_interval_s: float = 5.0


_KEYS = ("enabled", *TraceSettings.__dataclass_fields__)


def parse_tracing(raw: Any) -> TraceSettings | None:
    if raw is None:
        return None
    section = Node(raw, "tracing").mapping(_KEYS)
    if "enabled" not in section or not section["enabled"].boolean():
        return None
    values: dict[str, Any] = {}
    for key, node in section.items():
        if key in ("endpoint", "service_name"):
            values[key] = _url(node) if key == "endpoint" else node.string()
        elif key == "sample_ratio":
            ratio = node.number()
            if not 0 <= ratio <= 1:
                raise node.fail("must be between 0 and 1")
            values[key] = ratio
        elif key == "propagate":
            values[key] = node.boolean()
        elif key == "flush_interval_s":
            values[key] = node.number(positive=True)
        elif key == "headers":
            values[key] = _headers(node)
    return TraceSettings(**values)


def _url(node: Node) -> str:
    url = node.string()
    if not url.startswith(("http://", "https://")):
        raise node.fail("must be an http:// or https:// URL (OTLP/HTTP)")
    return url


def _headers(node: Node) -> tuple[tuple[str, str], ...]:
    if not isinstance(node.value, dict):
        raise node.fail("must be a mapping of header names to values")
    pairs = tuple((str(k), v) for k, v in node.value.items())
    for name, value in pairs:
        if not isinstance(value, str):
            raise ConfigError(f"{node.path}.{name}: must be a string")
    return pairs
