"""The YAML ``events:`` section: the tenant event log, its stream and webhooks.

The log is on whenever the gateway has a database (absent section: the
defaults below); the section only tunes it. It has no request hooks, so it
costs nothing per request; ``proxy.web.events_setup`` builds the log, the
webhook deliverer and the sweeper from it.

::

    events:
      retention_days: 30            # events older than this are deleted (a cursor
                                    # older than that replays what is left)
      stream:                       # GET /v1/events
        max_connections_per_tenant: 20   # per worker; one more gets 429
        send_queue: 256             # events waiting for one slow client; past it: closed (4008)
        heartbeat_s: 20             # WebSocket ping interval
      webhooks:
        max_attempts: 8             # then the delivery is marked failed
        backoff_s: 5                # wait before attempt 2; doubles each time
        max_backoff_s: 3600
        timeout_s: 10               # per attempt, connect to last byte
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from proxy.config.model import Config
from proxy.config.reader import Node
from proxy.stages.base import Stage


@dataclass(frozen=True, slots=True)
class StreamSettings:
    max_connections_per_tenant: int = 20
    send_queue: int = 256
    heartbeat_s: float = 20.0


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    max_attempts: int = 8
    backoff_s: float = 5.0
    max_backoff_s: float = 3600.0
    timeout_s: float = 10.0

    def retry_in(self, attempt: int) -> float | None:
        """Seconds before the attempt after ``attempt`` (1-based); None: none left."""
        if attempt >= self.max_attempts:
            return None
        return float(min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))


@dataclass(frozen=True, slots=True)
class EventSettings:
    retention_days: float = 30.0
    stream: StreamSettings = field(default_factory=StreamSettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)


def _sub(node: Node, cls: Any, integers: tuple[str, ...]) -> Any:
    out = cls()
    for key, sub in node.mapping(tuple(cls.__dataclass_fields__)).items():
        value: float = sub.integer(positive=True) if key in integers else sub.number(positive=True)
        out = replace(out, **{key: value})
    return out


def parse_events(raw: Any) -> EventSettings:
    if raw is None:
        return EventSettings()
    section = Node(raw, "events").mapping(("retention_days", "stream", "webhooks"))
    settings = EventSettings()
    if "retention_days" in section:
        settings = replace(settings, retention_days=section["retention_days"].number(positive=True))
    if "stream" in section:
        stream = _sub(
            section["stream"], StreamSettings, ("max_connections_per_tenant", "send_queue")
        )
        settings = replace(settings, stream=stream)
    if "webhooks" in section:
        hooks = _sub(section["webhooks"], WebhookSettings, ("max_attempts",))
        settings = replace(settings, webhooks=hooks)
    return settings


class EventsStage(Stage):
    """Owns ``events:``; never off (an absent section is the defaults)."""

    name: ClassVar[str] = "events"
    section: ClassVar[str | None] = "events"

    @classmethod
    def configure(cls, raw: Any, config: Config) -> object | None:
        return parse_events(raw)
