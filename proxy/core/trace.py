"""The pipeline's view of tracing: a tiny span interface and its no-op.

The pipeline, the gate and the forward stage open spans through ``Span``
and nothing else; the OpenTelemetry implementation lives in the tracing
stage (``proxy.stages.trace``), which lends a ``Tracer`` to each config
snapshot whose YAML turns ``tracing:`` on. Without it every request gets
``NO_SPAN``: one shared object whose methods do nothing and whose children
are itself, so a gateway with tracing off creates no span object per
request and pays a handful of empty calls.

A span never carries a prompt, a completion or a key: the implementation
reads names, statuses and counts from the records it is handed.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from types import TracebackType
from typing import Protocol

from proxy.core.record import AttemptRecord, UsageRecord


class Span(Protocol):
    """One unit of work in a request's trace; a context manager that ends it
    (an exception leaving the block marks it failed, by type name only)."""

    @property
    def trace_id(self) -> str | None:
        """The trace's id in hex (None when not traced): for the access log."""
        ...

    def child(self, name: str) -> Span:
        """A span under this one, started now."""
        ...

    def attempt(self, entry: AttemptRecord, system: str, retry: int, breaker: str) -> Span:
        """An upstream attempt's span; when it ends it takes the status from
        ``entry``. ``retry``: 0 for the first attempt; ``breaker``: the
        target's breaker state when it was picked."""
        ...

    def carrier(self) -> dict[str, str] | None:
        """The headers that carry this span to a provider (None: propagation off)."""
        ...

    def stamp(self, headers: MutableMapping[str, str]) -> None:
        """Put this span's W3C ``traceparent`` into ``headers`` (a response's)."""
        ...

    def finish(self, record: UsageRecord) -> None:
        """End a request's root span with what ``record`` says of the request."""
        ...

    def end(self) -> None: ...

    def __enter__(self) -> Span: ...

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class Tracer(Protocol):
    def request(self, endpoint: str, headers: Mapping[str, str]) -> Span:
        """A request's root span, a child of the client's ``traceparent`` if
        ``headers`` carry a valid one (its trace id is kept either way)."""
        ...


class NoSpan:
    """The span of an untraced request: every method does nothing."""

    __slots__ = ()
    trace_id: str | None = None

    def child(self, name: str) -> NoSpan:
        return self

    def attempt(self, entry: AttemptRecord, system: str, retry: int, breaker: str) -> NoSpan:
        return self

    def carrier(self) -> dict[str, str] | None:
        return None

    def stamp(self, headers: MutableMapping[str, str]) -> None:
        return None

    def finish(self, record: UsageRecord) -> None:
        return None

    def end(self) -> None:
        return None

    def __enter__(self) -> NoSpan:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


class NoTracer:
    __slots__ = ()

    def request(self, endpoint: str, headers: Mapping[str, str]) -> NoSpan:
        return NO_SPAN


NO_SPAN = NoSpan()
NO_TRACER = NoTracer()
