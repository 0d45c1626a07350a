"""The provider interface: two methods, ``complete()`` and ``stream()``.

Every adapter speaks OpenAI's shapes towards the gateway whatever its wire
format, so relay and metering are written once:

- ``complete(call)`` returns a ``Reply`` whose body is an OpenAI response
  JSON, with ``usage`` read from what the provider reported (None when it
  reported nothing).
- ``stream(call)`` opens the upstream request and returns once the provider
  has answered with a success status; iterating the ``UpstreamStream`` yields
  whole SSE events carrying OpenAI ``chat.completion.chunk`` (or
  ``text_completion``) payloads, ending with ``data: [DONE]``; ``batches()``
  yields the same events in lists, one list per upstream read. When the
  provider reports usage, the adapter emits it as OpenAI's final usage chunk
  (``choices: []``) so metering finds it in one place.

Errors before the first byte are raised from ``complete``/``stream`` (so the
forward stage may still fall back); errors while iterating are raised from the
iterator as ``UpstreamStreamBroken``/``UpstreamTimeout``. ``aclose()`` must
release the upstream connection promptly; the relay calls it when the client
goes away, which cancels the provider request.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from proxy.config.model import ProviderConfig, Timeouts
from proxy.core.usage import Usage

Endpoint = Literal["chat", "completions", "embeddings", "moderations"]
# The endpoints whose answer is generated text: they take a completion limit
# and may stream. Embeddings and moderations only read their input.
GENERATIVE: frozenset[str] = frozenset({"chat", "completions"})


@dataclass(slots=True)
class Call:
    endpoint: Endpoint
    body: dict[str, Any]  # the client's validated body; adapters copy before changing it
    model: str  # the provider's model name
    stream: bool
    request_id: str
    # The target's timeouts (the provider's as its model overrides them, a
    # non-stream total cut to the retry deadline); None: the provider's. An
    # adapter must apply them to its upstream request (``http.post`` does):
    # the forward stage bounds only a stream's first event itself.
    timeouts: Timeouts | None = None
    # The completion-limit parameter the target's model accepts (its model
    # family): an OpenAI-wire adapter sends the request's limit under this
    # name only. None: as the client sent it.
    token_limit: str | None = None
    # Sent to the provider with this attempt (its W3C traceparent, when
    # tracing propagates); None: nothing more.
    trace_headers: dict[str, str] | None = None
    # A front door's API (``messages``, ``responses``) when ``body`` is the
    # client's own body in that API, for a provider that ``speaks`` it
    # (``native_complete`` / ``native_stream``); None: OpenAI's shapes.
    api: str | None = None
    # With ``api``: the client's headers of that API the provider gets too
    # (``Door.native_headers``), merged into the provider's own.
    native_headers: Mapping[str, str] | None = None


@dataclass(slots=True)
class Reply:
    body: bytes
    usage: Usage | None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


class UpstreamStream(ABC):
    headers: dict[str, str]

    @abstractmethod
    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def batches(self) -> AsyncIterator[list[bytes]]:
        """The same events grouped as they arrived, so the relay can pass a
        group on in one write: here one event per group; an adapter that
        reads SSE from the wire groups the events of each upstream read."""
        async for event in self:
            yield [event]

    _grouped: AsyncIterator[list[bytes]] | None = None

    async def read(self) -> bytes:
        """The next group of ``batches()`` as one bytes, b"" at the end: what
        the relay reads. An adapter reading SSE from the wire overrides it
        with its read loop (``http.EventBody``), one call per upstream read."""
        if self._grouped is None:
            self._grouped = self.batches()
        while (batch := await anext(self._grouped, None)) is not None:
            if events := b"".join(batch):
                return events
        return b""

    # ``pushed(deliver)``, where the adapter can: hands each later read's
    # whole events (what ``read`` would return) to ``deliver`` as they
    # arrive, without a wake-up of the reading task per read, until
    # ``deliver`` returns False or the stream ends or fails; ``read`` then
    # takes over and raises or returns what is left (``http.EventBody``).
    # Only after the first ``read``. None: ``read`` only.
    pushed: Callable[[Callable[[bytes], bool]], Awaitable[None]] | None = None

    @abstractmethod
    async def aclose(self) -> None: ...


class BatchedStream(UpstreamStream):
    """A stream that reads its events in batches: iterating it yields the
    events of ``batches()`` one by one."""

    async def __aiter__(self) -> AsyncIterator[bytes]:  # type: ignore[override]
        async for batch in self.batches():
            for event in batch:
                yield event

    @abstractmethod
    def batches(self) -> AsyncIterator[list[bytes]]: ...


class Provider(ABC):
    def __init__(self, config: ProviderConfig) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    @abstractmethod
    async def complete(self, call: Call) -> Reply: ...

    @abstractmethod
    async def stream(self, call: Call) -> UpstreamStream: ...

    def speaks(self, api: str) -> bool:
        """Whether the provider serves the front-door API ``api`` itself, so
        a request made in it can go upstream as the client sent it."""
        return False

    async def native_complete(self, call: Call) -> Reply:
        """``call.body`` (in ``call.api``) to the provider's own endpoint
        for it; the reply's body is the provider's, as it answered."""
        raise NotImplementedError(f"provider '{self.name}' does not speak {call.api}")

    async def native_stream(self, call: Call) -> UpstreamStream:
        """As ``native_complete``, streamed: whole SSE events of the API's
        own, as the provider sent them; an ``error`` event raises
        ``UpstreamStreamBroken`` (before it, the events are yielded)."""
        raise NotImplementedError(f"provider '{self.name}' does not speak {call.api}")
