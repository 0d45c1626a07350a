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
- ``on_answer(ex, settings, reply)`` (async): a non-stream answer as the
  provider gave it, for checks that must await (output moderation); return
  the reply or raise. Runs before ``on_reply``.
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
from datetime import date
from typing import Any, ClassVar, Protocol

import aiohttp
from aiohttp import web

from proxy.config.model import Config
from proxy.core.errors import GatewayError
from proxy.core.events import EventSink, NoEvents
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
    # The tenant event sink (``proxy.core.events``): the durable event log
    # with its webhooks and stream when there is a database, else a no-op.
    events: EventSink = field(default_factory=NoEvents)


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
    # The front door the client came through (``proxy.doors``), None for the
    # endpoint's own API: whatever answers the request (the relay, a cache
    # hit) hands its chat-shaped answer to it to translate.
    door: Door | None = None
    # False: a stage changed the request (guardrails' input rewrite, a
    # stored conversation) or must see the answer in chat shape (output
    # checks, a cache keeping it), so a front door's request may not go as
    # the client sent it to a provider that speaks the door's API.
    passthrough: bool = True

    # A batch line's usage row key (its batch and custom_id), so a line run
    # twice (its worker was killed) is billed once; "" draws one at admission.
    event_id: str = ""
    # ... and the month a run of it was billed in before, if one was: a line
    # run again in the next month still makes a single row.
    billed_in: date | None = None

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


class DoorStream(Protocol):
    """One streamed answer through a front door."""

    def feed(self, data: bytes) -> bytes:
        """Whole chat-completion SSE events (``data: [DONE]`` included, when
        it comes) in; the door's own events out."""
        ...

    def fail(self, exc: GatewayError) -> bytes:
        """The stream broke after its headers went out: the door's error events."""
        ...


class Door(Protocol):
    """A client API other than the endpoint's own (OpenAI's Responses,
    Anthropic's Messages), translated at the edges: the pipeline runs the
    request as the chat completion ``to_chat`` makes of it, and the door
    turns the answer back into its own shape. One per request."""

    @property
    def name(self) -> str:
        """The API's name in rows, metrics and the access log."""
        ...

    def to_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """The client's body as a chat completions body; a GatewayError when it is invalid."""
        ...

    async def prepare(self, ex: Exchange) -> None:
        """Once the caller is known, before routing: complete ``ex.body`` from
        state the door's API keeps for the caller (a stored conversation)."""
        ...

    def reply(self, body: bytes) -> bytes:
        """A non-stream chat completion (JSON) as the door's answer."""
        ...

    def stream(self) -> DoorStream: ...

    async def finish(self, ex: Exchange) -> None:
        """At settle, awaited before the client sees the answer end: keep
        what the door's API keeps (a stored response). Never raises."""
        ...

    # Passed through, to a provider that speaks the door's API (its ``name``):

    def native_body(self, model: str, limit: int | None) -> dict[str, Any]:
        """The client's own body for such a provider: ``model`` the
        provider's, ``limit`` (the completion limit as the gateway capped
        it; None: as sent) under the API's own parameter name."""
        ...

    def native_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """The client's request headers such a provider gets too: its API's
        own options (Anthropic's ``anthropic-beta``), nothing else."""
        ...

    def native_reply(self, body: bytes) -> bytes:
        """Such a provider's non-stream answer, as the client gets it
        (unchanged; the door may keep what it needs of it)."""
        ...

    def native_meter(self) -> StreamMeter:
        """The meter of such a provider's stream, in the API's own events:
        their usage, and the text delivered when the stream is cut."""
        ...

    def native_stream(self) -> DoorStream:
        """Such a provider's events to the client, unchanged; its ``fail``
        is the API's own error event."""
        ...


_NO_HEADERS: Mapping[str, str] = {}


class ChunkFilter(Protocol):
    def feed(self, data: bytes) -> bytes:
        """One upstream read's whole SSE events, as the client would get them;
        return what the client gets instead (``b""`` to hold it back)."""
        ...


class AsyncChunkFilter:
    """A chunk filter that must await (a moderation verdict) before it can
    say what the client gets; the relay awaits ``feed_async`` instead of
    calling ``feed``. A base class, not a protocol: the relay tells them
    apart with one ``isinstance`` per read."""

    async def feed_async(self, data: bytes) -> bytes:
        raise NotImplementedError

    def feed(self, data: bytes) -> bytes:
        """Never called by the relay; here so that it is a ``ChunkFilter`` too."""
        raise TypeError("an AsyncChunkFilter is fed with feed_async")


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

    async def on_answer(self, ex: Exchange, settings: Any, reply: Reply) -> Reply:
        return reply

    def on_reply(self, ex: Exchange, settings: Any, reply: Reply) -> Reply:
        return reply

    def on_stream(self, ex: Exchange, settings: Any) -> ChunkFilter | None:
        return None

    def on_settle(self, ex: Exchange, settings: Any) -> None:
        return None

    def tracer(self, settings: Any) -> Tracer | None:
        return None


HOOKS = ("on_request", "on_answer", "on_reply", "on_stream", "on_settle")


def overrides(stage: Stage, hook: str) -> bool:
    """Whether ``stage`` implements ``hook`` (a base no-op costs nothing: it is never called)."""
    return getattr(type(stage), hook) is not getattr(Stage, hook)
