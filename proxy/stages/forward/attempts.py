"""The forward stage: walk the route plan until a provider answers.

The invariant: nothing is retried or re-routed once the client may have
seen a byte. The boundary is where ``forward`` returns —

- non-stream: the provider's whole reply has been read;
- stream: the provider answered with a success status *and* its first SSE
  event has been read (not yet sent). A provider that answers 200 and then
  stalls or resets before any event is therefore still retried. From then
  on the relay owns the stream, and a failure becomes an OpenAI-shaped SSE
  error event, never a second attempt.

Before the boundary, a failure moves on when ``retry.retryable`` allows
(connect errors, resets, timeouts, 408/409/429, 5xx; any other 4xx ends the
request as is). ``retry.Schedule`` picks what comes next: targets not yet
tried first, in ``balance.arrange`` order (weighted or least-in-flight,
ejected targets left out), then retries of tried ones after backoff or
``retry-after``; all within ``max_attempts`` and ``deadline_s``. Each attempt
reports to the target's circuit breaker and is logged in the usage record's
``attempt_log``, since a provider may bill what it received.

Timeouts per target (the provider's, as its model overrides them): the wait
for the boundary is bounded by ``first_byte`` (stream) or ``total``
(non-stream) and never runs past the deadline; after it each gap between
reads is bounded by ``idle`` and the whole stream by ``total``. The stream's
first event is bounded here, around any adapter; everything else is the
provider client's one timer per request (first_byte until the answer
begins, idle after it, and ``total``; see ``providers.h1``), set from
``Call.timeouts``, whose ``total`` a non-stream attempt gets cut to
the time left before the deadline. The adapter raises ``UpstreamTimeout``
when one fires, which ``GuardedStream`` reports to the breaker like any
other mid-stream failure.

When the plan is exhausted the client gets the most telling error: the last
408/409/429 a provider sent, as is (with ``retry-after``); else 504 when
time ran out, 502 when providers failed, 503 when no target could be tried.
Every error names providers by their config name, never by URL.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.config.model import Config, Timeouts
from proxy.core.errors import (
    GatewayError,
    ProviderHTTPError,
    ServiceUnavailable,
    UpstreamConnectError,
    UpstreamError,
    UpstreamRedirect,
    UpstreamStreamBroken,
    UpstreamTimeout,
)
from proxy.core.record import AttemptRecord, UsageRecord
from proxy.core.sse import split_events
from proxy.core.trace import NO_SPAN, Span
from proxy.providers.base import Call, Provider, Reply, UpstreamStream
from proxy.stages.forward.balance import InFlight, Slot, arrange
from proxy.stages.forward.breaker import Breakers, Health, MemoryBreakerStore, verdict
from proxy.stages.forward.provider_limits import Permit, ProviderGate
from proxy.stages.forward.retry import Schedule, retry_after, retryable
from proxy.stages.route import RoutePlan, Target


class Snapshot(Protocol):
    """What forward reads of the live config snapshot (``proxy.pipeline.snapshot``)."""

    @property
    def config(self) -> Config: ...

    @property
    def providers(self) -> Mapping[str, Provider]: ...


@dataclass(slots=True)
class Upstreams:
    """What the forward stage keeps across requests: one per app."""

    breakers: Breakers = field(default_factory=lambda: Breakers(MemoryBreakerStore()))
    inflight: InFlight = field(default_factory=InFlight)
    rng: random.Random = field(default_factory=random.Random)  # backoff jitter
    gate: ProviderGate | None = None  # provider limits (rpm, tpm, concurrency), set at start


@dataclass(frozen=True, slots=True)
class Native:
    """The client's own request in a front door's API (``api``: the door's
    name), for each attempt whose provider speaks that API; ``body`` makes
    it for the target's provider model."""

    api: str
    body: Callable[[str], dict[str, Any]]
    headers: Mapping[str, str] | None = None  # the client's, for it (``Door.native_headers``)


@dataclass(slots=True)
class Forwarded:
    target: Target
    attempts: int
    reply: Reply | None = None
    stream: UpstreamStream | None = None
    native: bool = False  # the answer is in the door's API, as the provider sent it


async def forward(
    upstreams: Upstreams,
    snapshot: Snapshot,
    plan: RoutePlan,
    call: Call,
    record: UsageRecord,
    trace: Span = NO_SPAN,
    native: Native | None = None,
) -> Forwarded:
    """``call`` is the request as the client made it; each attempt rewrites
    its model and timeouts for the target. ``record`` gets every attempt,
    ``trace`` (the request's span) a child span per attempt. ``native``: the
    request as a front door's client sent it, which an attempt whose
    provider speaks that API sends instead of ``call``'s chat body (the
    decision is per attempt: a fallback to another provider is translated)."""
    # The mirror's view (a shared store's too): no coroutine, no wait.
    health = upstreams.breakers.health_now([t.key for g in plan.groups for t in g.targets])
    return await _Run(upstreams, snapshot, plan, call, record, health, trace, native).walk()


class _Run:
    """One request's walk over its plan."""

    def __init__(
        self,
        ups: Upstreams,
        snapshot: Snapshot,
        plan: RoutePlan,
        call: Call,
        record: UsageRecord,
        health: dict[str, Health],
        trace: Span,
        native: Native | None,
    ) -> None:
        self.ups, self.snapshot, self.plan = ups, snapshot, plan
        self.call, self.record, self.health = call, record, health
        self.trace = trace
        self.deadline = time.monotonic() + plan.retry.deadline_s
        order = arrange(plan, health, ups.inflight)
        self.schedule = Schedule(order, plan.retry, self.deadline, ups.rng)
        self.attempts = 0
        self.last: GatewayError | None = None
        self.last_4xx: ProviderHTTPError | None = None
        self.refused: GatewayError | None = None  # a provider limit said no
        self.out_of_time = False
        self.native = native

    async def walk(self) -> Forwarded:
        gate = self.ups.gate
        while self.attempts < self.plan.retry.max_attempts:
            now = time.monotonic()
            pick = self.schedule.next(now)
            if pick is None:
                break
            target, wait = pick
            if now + wait >= self.deadline:
                self.out_of_time = True
                break
            if wait:
                await asyncio.sleep(wait)
            permit = None
            if gate is not None and gate.limits_any(self.snapshot.config):
                try:
                    permit = await self._permit(gate, target)
                except GatewayError as exc:  # over a provider limit: the next target
                    self.schedule.drop(target)
                    self.refused = exc
                    continue
            seen = self.health[target.key]
            if seen == "half_open":  # a closed (or tried-anyway open) one needs no probe slot
                lease = self.deadline - time.monotonic() + 1
                if not await self.ups.breakers.acquire(target.key, seen, lease):
                    self.schedule.drop(target)  # another request is probing it
                    if permit is not None:
                        permit.release()
                    continue
            self.schedule.started(target)
            try:
                return await self._attempt(target, permit)
            except GatewayError as exc:
                await self._failed(target, exc)
        raise self._exhausted()

    async def _permit(self, gate: ProviderGate, target: Target) -> Permit | None:
        member = f"{self.call.request_id}:{self.attempts + 1}"
        return await gate.enter(self.snapshot.config, target, self.call, member)

    async def _attempt(self, target: Target, permit: Permit | None) -> Forwarded:
        self.attempts += 1
        entry = AttemptRecord(provider=target.provider.name, model=target.model)
        self._note(entry)
        self.record.served_model = target.public
        provider = self.snapshot.providers[target.provider.name]
        breaker = self.health.get(target.key, "closed")
        span = self.trace.attempt(entry, target.provider.kind, self.attempts - 1, breaker)
        c = self.call  # built field by field: dataclasses.replace costs more
        native = self.native if self.native and provider.speaks(self.native.api) else None
        call = Call(
            c.endpoint,
            c.body if native is None else native.body(target.model),
            target.model,
            c.stream,
            c.request_id,
            self._timeouts(target),
            target.token_limit,
            span.carrier(),
            None if native is None else native.api,
            None if native is None else native.headers,
        )
        slot = self.ups.inflight.enter(target.key, permit.release if permit else None)
        started = time.monotonic()
        try:
            if call.stream:
                done = await self._open_stream(provider, call, target, slot)
            else:
                done = await self._complete(provider, call, target)
        except GatewayError as exc:
            entry.status, entry.error_code = exc.http_status, exc.error_code
            entry.reached = not isinstance(exc, UpstreamConnectError)
            raise
        except BaseException:
            entry.status = 499  # the client went away: abandoned, maybe billed
            raise
        finally:
            entry.latency_ms = (time.monotonic() - started) * 1000
            span.end()  # at the boundary: a stream's relay is the request span's
            if not (call.stream and entry.status == 200):
                slot.release()  # an open stream keeps its slot until the relay closes it
        if self.ups.breakers.success_changes(target.key):  # else record() would change nothing
            await self._report(target, None)
        return done

    def _note(self, entry: AttemptRecord) -> None:
        self.record.attempt_log.append(entry)
        self.record.attempts = self.attempts
        self.record.provider, self.record.provider_model = entry.provider, entry.model

    def _timeouts(self, target: Target) -> Timeouts:
        """The attempt's timeouts: the target's, with a non-stream ``total``
        cut to the deadline (the whole reply is the boundary there)."""
        t = target.timeouts
        if self.call.stream:
            return t
        left = self.deadline - time.monotonic()
        if left >= t.total:
            return t
        # Never a total of 0 or less: the attempt would time out unsent.
        return Timeouts(
            connect=t.connect, first_byte=t.first_byte, idle=t.idle, total=max(left, 1e-3)
        )

    async def _complete(self, provider: Provider, call: Call, target: Target) -> Forwarded:
        # Bounded by the attempt's timeouts (``_timeouts``), no timer of our own.
        if call.api is None:
            reply = await provider.complete(call)
        else:
            reply = await provider.native_complete(call)
        self.record.attempt_log[-1].status = reply.status
        return Forwarded(target, self.attempts, reply=reply, native=call.api is not None)

    async def _open_stream(
        self, provider: Provider, call: Call, target: Target, slot: Slot
    ) -> Forwarded:
        budget = min(target.timeouts.first_byte, self.deadline - time.monotonic())
        try:
            async with asyncio.timeout(budget):
                if call.api is None:
                    upstream = await provider.stream(call)
                else:
                    upstream = await provider.native_stream(call)
                first = await _first_events(upstream, target.provider.name)
        except TimeoutError:
            raise UpstreamTimeout(
                f"provider '{target.provider.name}' did not answer within {budget:.3g}s"
            ) from None
        self.record.attempt_log[-1].status = 200
        guarded = GuardedStream(upstream, first, slot, lambda e: self._report(target, e))
        return Forwarded(target, self.attempts, stream=guarded, native=call.api is not None)

    async def _failed(self, target: Target, exc: GatewayError) -> None:
        await self._report(target, exc)
        if not retryable(exc, self.plan.retry):
            raise self._tagged(exc)
        self.last = exc
        hint = None
        if isinstance(exc, ProviderHTTPError):
            if exc.http_status < 500:
                self.last_4xx = exc
            hint = retry_after(exc.headers)
        self.schedule.failed(target, time.monotonic(), hint)
        if isinstance(exc, UpstreamRedirect):
            self.schedule.drop(target)  # a wrong address, not a blip: other targets only

    async def _report(self, target: Target, exc: GatewayError | None) -> None:
        outcome = verdict(exc, target.provider.breaker)
        may_eject = outcome == "failure" and await self._others_healthy(target)
        await self.ups.breakers.record(target.key, target.provider.breaker, outcome, may_eject)

    async def _others_healthy(self, target: Target) -> bool:
        """Whether the target's model has another target that is not ejected."""
        group = next(g for g in self.plan.groups if any(t is target for t in g.targets))
        others = [t.key for t in group.targets if t is not target]
        health = await self.ups.breakers.health(others) if others else {}
        return any(h != "open" for h in health.values())

    def _exhausted(self) -> GatewayError:
        n, model = self.attempts, self.plan.public_model
        err: GatewayError
        if self.last_4xx is not None:
            err = self.last_4xx
        elif self.out_of_time:
            err = UpstreamTimeout(
                f"No provider answered for '{model}' within {self.plan.retry.deadline_s:g}s "
                f"({n} attempt{'s' if n != 1 else ''})."
            )
        elif isinstance(self.last, UpstreamError):
            err = self.last
        elif isinstance(self.last, ProviderHTTPError):
            name, status = self.record.provider, self.last.http_status
            # An overloaded provider's 503 (Anthropic's 529 maps to it) tells
            # the client to come back; any other 5xx is a bad gateway.
            unavailable = status in (503, 529)
            err = (ServiceUnavailable if unavailable else UpstreamError)(
                f"provider '{name}' failed with HTTP {status} ({n} attempt{'s' if n != 1 else ''})."
            )
        elif self.refused is not None:
            err = self.refused
        else:
            err = ServiceUnavailable(
                f"No provider for '{model}' is available right now; retry shortly."
            )
        return self._tagged(err)

    def _tagged(self, err: GatewayError) -> GatewayError:
        err.headers["x-tollway-attempts"] = str(self.attempts)
        if self.record.provider is not None and self.record.provider_model is not None:
            err.headers["x-tollway-provider"] = self.record.provider
            err.headers["x-tollway-model"] = self.record.provider_model
        return err


async def _first_events(upstream: UpstreamStream, name: str) -> bytes:
    """The stream's first read of whole events; the upstream is closed on failure."""
    try:
        first = await upstream.read()
    except BaseException:
        await upstream.aclose()
        raise
    if not first:
        await upstream.aclose()
        raise UpstreamStreamBroken(f"provider '{name}' ended the stream before sending anything")
    return first


class GuardedStream(UpstreamStream):
    """The upstream stream as the relay sees it: the first events (already
    read by ``forward``) come first; a provider failure, the idle gap and
    the total time included (the adapter raises them as ``UpstreamError``,
    from its read loop or the attempt's timeouts), counts against the
    target's breaker; the in-flight slot is freed on close."""

    def __init__(
        self,
        upstream: UpstreamStream,
        first: bytes,
        slot: Slot,
        on_broken: Callable[[GatewayError], Awaitable[None]],
    ) -> None:
        self.headers = upstream.headers
        self.pushed = upstream.pushed  # its failures still come out of ``read``
        self._upstream, self._first = upstream, first
        self._slot, self._on_broken = slot, on_broken

    async def read(self) -> bytes:
        if self._first:
            first, self._first = self._first, b""
            return first
        try:
            return await self._upstream.read()
        except UpstreamError as exc:
            await self._on_broken(exc)
            raise

    async def __aiter__(self) -> AsyncIterator[bytes]:  # type: ignore[override]
        while events := await self.read():
            for event in split_events(events):
                yield event

    async def aclose(self) -> None:
        self._slot.release()
        await self._upstream.aclose()
