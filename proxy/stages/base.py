"""What a stage is: a class with named hooks, its YAML section, its resources.

mitmproxy's addons are the model: a feature is one class, registered once in
``proxy.pipeline.registry.STAGES``, and the pipeline calls only the hooks a
stage overrides, only while its section enables it. A hook may answer the
request itself (a cache hit) or raise a ``GatewayError`` (a guardrail).

The hooks, in the order the pipeline calls them:

- ``configure(raw, config)`` (at config load, a classmethod): validate the
  stage's own YAML section and return its frozen settings, or None for
  "off". Errors are ``ConfigError`` naming the key path.
- ``open(services)`` / ``close()`` (once per app): take what the stage needs
  (Redis, the task group) and let it go at shutdown.
- ``on_request(ex, settings)``: after admission, before forward. Return a
  response to answer the request without a provider.
- ``on_reply(ex, settings, reply)``: a non-stream answer, before the client
  has it; return the reply (changed or not).
- ``on_stream(ex, settings)``: a stream is starting; return a
  ``ChunkFilter`` that sees (and may change) every piece of it, or None.
- ``on_settle(ex, settings)``: the request has ended, however it ended,
  and ``ex.record`` holds its final status and usage; called before the
  settlers, never raises into the request.

Not per request: ``tracer(settings)``, asked once per config snapshot, lends
the pipeline a ``proxy.core.trace.Tracer`` (the tracing stage's); the first
enabled stage that returns one traces every request of that snapshot.

Settlers (billing, metrics, the access log) are not stages: they are one
tuple built in ``proxy.web.settlers``, told of every request once it ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import aiohttp
from aiohttp import web

from proxy.config.model import Config
from proxy.core.errors import GatewayError
from proxy.core.metering import StreamMeter
from proxy.core.principal import Principal
from proxy.core.record import UsageRecord
from proxy.core.tasks import TaskGroup
from proxy.core.trace import NO_SPAN, Span, Tracer
from proxy.providers.base import Endpoint, Reply
from proxy.stores.redis_client import SharedRedis


@dataclass(frozen=True, slots=True)
class Services:
    """What the app lends its stages for their whole life."""

    http: aiohttp.ClientSession
    tasks: TaskGroup
    redis: SharedRedis | None = None  # None: no Redis configured
    # The semantic cache's: the gateway's Postgres (``SEMANTIC_CACHE_DATABASE_URL``
    # or the billing database; None without one), and embeddings through the
    # gateway's own routing (``proxy.pipeline.embed``).
    database_url: str | None = None
    embedder: Embedder | None = None
    # A stage section's settings in the live config snapshot (what ``configure``
    # returned, None when the section is off), for work outside any request.
    live_settings: Callable[[str], object | None] = lambda section: None
    # The guardrails' moderation through the gateway's own routing
    # (``proxy.pipeline.moderate``).
    moderator: Moderator | None = None


class Embedder(Protocol):
    async def embed(
        self, model: str, text: str, parent: UsageRecord, bill_tenant: bool, timeout_s: float
    ) -> list[float]:
        """``text``'s vector from the public ``model``, as one internal
        embeddings request settled as its own usage row (named after
        ``parent``'s tenant when ``bill_tenant``). Raises on any failure,
        including ``timeout_s`` running out."""
        ...


class Moderator(Protocol):
    async def moderate(
        self, model: str, texts: list[str], parent: UsageRecord, bill_tenant: bool, timeout_s: float
    ) -> list[dict[str, Any]]:
        """One ``/v1/moderations`` result per text from the public ``model``,
        as one internal request settled as its own usage row. Raises on any
        failure, including ``timeout_s`` running out."""
        ...


@dataclass(slots=True)
class Exchange:
    """One request as it passes the stages: what arrived, who sent it, where
    it goes, and what each stage wants to remember about it."""

    # None: a batch line (``proxy.pipeline.batch_line``), which is never
    # streamed and has no client connection or headers of its own.
    request: web.Request | None
    record: UsageRecord
    config: Config
    endpoint: Endpoint
    body: dict[str, Any]
    started: float
    who: Principal | None = None
    model: str = ""  # the public model, once routed
    # Sent with a successful answer (request id, limits, a stage's verdict).
    headers: dict[str, str] = field(default_factory=dict)
    meter: StreamMeter | None = None  # set when a stream starts
    reply: Reply | None = None  # a non-stream answer, once it arrived
    notes: dict[str, object] = field(default_factory=dict)  # per stage, by stage name
    # False: a stage must see this request's own answer (guardrails' output
    # checks and restore), so no cache may answer it or keep its answer.
    cacheable: bool = True
    trace: Span = NO_SPAN  # the request's root span (the no-op one when not traced)
    # Checks running beside forward (a guardrail's ``parallel`` moderation),
    # each ending with None (pass) or the error that refuses the request: the
    # answer's first byte waits for them, and a refusal cancels the upstream
    # (``proxy.pipeline.hold``).
    checks: list[asyncio.Future[GatewayError | None]] = field(default_factory=list)
    # A batch line's usage row key (its batch and custom_id), so a line run
    # twice (its worker was killed) is billed once; "" draws one at admission.
    event_id: str = ""

    @property
    def inbound(self) -> Mapping[str, str]:
        """The client's request headers (none for a batch line)."""
        return self.request.headers if self.request is not None else _NO_HEADERS

    def client(self) -> web.Request:
        """The client's connection, for an answer streamed to it."""
        assert self.request is not None, "a batch line is never streamed"
        return self.request

    @property
    def scope(self) -> str:
        """Whose data this is: ``t<tenant id>``, or ``gw`` without API keys."""
        return f"t{self.who.tenant_id}" if self.who is not None else "gw"


_NO_HEADERS: Mapping[str, str] = {}


class ChunkFilter(Protocol):
    def feed(self, data: bytes) -> bytes:
        """One upstream read's whole SSE events, as the client would get them;
        return what the client gets instead (``b""`` to hold it back)."""
        ...


class Stage:
    """Base class: every hook is optional; only overridden ones are called."""

    name: ClassVar[str]
    section: ClassVar[str | None] = None  # the YAML top-level key it owns, if any

    @classmethod
    def configure(cls, raw: Any, config: Config) -> object | None:
        """``raw``: the section as written (None when absent)."""
        return None

    async def open(self, services: Services) -> None:
        return None

    async def close(self) -> None:
        return None

    async def on_request(self, ex: Exchange, settings: Any) -> web.StreamResponse | None:
        return None

    def on_reply(self, ex: Exchange, settings: Any, reply: Reply) -> Reply:
        return reply

    def on_stream(self, ex: Exchange, settings: Any) -> ChunkFilter | None:
        return None

    def on_settle(self, ex: Exchange, settings: Any) -> None:
        return None

    def tracer(self, settings: Any) -> Tracer | None:
        return None


HOOKS = ("on_request", "on_reply", "on_stream", "on_settle")


def overrides(stage: Stage, hook: str) -> bool:
    """Whether ``stage`` implements ``hook`` (a base no-op costs nothing: it is never called)."""
    return getattr(type(stage), hook) is not getattr(Stage, hook)
