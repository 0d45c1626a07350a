"""Circuit breaking: eject a failing target for a while, then probe it.

One breaker per target (``"provider/model"``), configured per provider::

    closed ──`failures` in a row──► open ──cooldown over──► half-open
      ▲                              ▲                          │ one probe
      └────── probe succeeded ───────┼────── probe failed ──────┘

A failure is a 5xx, a timeout, a connect error or a broken stream; a 429
only when ``trip_on_429`` is set. Any other 4xx shows the provider working
and resets the count. Each ejection in a row doubles the cooldown, up to
``max_cooldown_s``; once a target has stayed healthy that long, the next
ejection starts from ``cooldown_s`` again. The last healthy target of a model
is never ejected (the caller says whether ejecting is allowed), and a stream
already flowing from a target is never touched by its breaker.

Transitions are pure functions on ``BreakerState``, applied through a
``BreakerStore`` so that a shared store (Redis) can apply them atomically and
every instance sees the same ejections. ``MemoryBreakerStore`` keeps them per
process; ``breaker_redis.RedisBreakerStore`` shares them through Redis.
Times are wall-clock seconds because a shared store spans hosts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, Protocol

from proxy.config.model import BreakerPolicy
from proxy.core.errors import GatewayError, ProviderHTTPError, UpstreamError

Health = Literal["closed", "half_open", "open"]
Verdict = Literal["ok", "failure", "neutral"]
Transition = Callable[["BreakerState"], "BreakerState | None"]  # None: no change


@dataclass(frozen=True, slots=True)
class BreakerState:
    failures: int = 0  # consecutive
    tripped: bool = False  # ejected, or half-open until a probe succeeds
    ejections: int = 0  # ejections in a row, for the growing cooldown
    open_until: float = 0.0
    probe_until: float = 0.0  # a half-open probe holds the target until then


CLEAN = BreakerState()


def health(state: BreakerState, now: float) -> Health:
    if not state.tripped:
        return "closed"
    if now < state.open_until or now < state.probe_until:
        return "open"
    return "half_open"


def verdict(exc: GatewayError | None, policy: BreakerPolicy) -> Verdict:
    """What one attempt's outcome says about the target's health."""
    if exc is None:
        return "ok"
    if isinstance(exc, ProviderHTTPError):
        if exc.http_status == 429:
            return "failure" if policy.trip_on_429 else "neutral"
        return "failure" if exc.http_status >= 500 else "ok"
    return "failure" if isinstance(exc, UpstreamError) else "neutral"


def on_success(state: BreakerState) -> BreakerState | None:
    if not state.tripped and not state.failures:
        return None
    return replace(state, failures=0, tripped=False, probe_until=0.0)


def on_neutral(state: BreakerState) -> BreakerState | None:
    # Neither healthy nor failing (a 429, an abandoned request): free the probe slot.
    return replace(state, probe_until=0.0) if state.probe_until else None


def on_failure(
    state: BreakerState, policy: BreakerPolicy, now: float, may_eject: bool
) -> BreakerState | None:
    if state.tripped and now < state.open_until:
        return None  # already ejected; it was tried as a last resort
    failures = state.failures + 1
    if not may_eject:
        return replace(state, failures=failures, tripped=False, probe_until=0.0)
    if state.tripped or failures >= policy.failures:
        # A second ejection soon after the last one doubles the cooldown.
        again = state.ejections > 0 and now - state.open_until < policy.max_cooldown_s
        ejections = state.ejections + 1 if again else 1
        cooldown = min(policy.cooldown_s * 2 ** (ejections - 1), policy.max_cooldown_s)
        return BreakerState(failures, True, ejections, now + cooldown)
    return replace(state, failures=failures)


def on_probe(now: float, lease: float) -> Transition:
    def take(state: BreakerState) -> BreakerState | None:
        if health(state, now) != "half_open":
            return None
        return replace(state, probe_until=now + lease)

    return take


class BreakerStore(Protocol):
    """Where breaker states live. ``update`` applies a transition atomically
    and returns the new state, or None when the transition changed nothing;
    ``ttl`` is how long a shared store should keep the key."""

    async def get(self, keys: Sequence[str]) -> list[BreakerState]: ...

    async def update(self, key: str, fn: Transition, ttl: float) -> BreakerState | None: ...

    def peek(self, keys: Sequence[str]) -> list[BreakerState]:
        """``get`` without a coroutine: what this process knows now (a shared
        store's mirror), for the request path, which never waits on it."""
        ...

    def state(self, key: str) -> BreakerState:
        """One target's state as ``update`` would start from it here."""
        ...


class MemoryBreakerStore:
    """Per-process states; only targets with a history take memory."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._states: dict[str, BreakerState] = {}
        self._max = max_entries

    async def get(self, keys: Sequence[str]) -> list[BreakerState]:
        return self.peek(keys)

    def peek(self, keys: Sequence[str]) -> list[BreakerState]:
        states = self._states
        return [states.get(k, CLEAN) for k in keys] if states else [CLEAN] * len(keys)

    def state(self, key: str) -> BreakerState:
        return self._states.get(key, CLEAN)

    async def update(self, key: str, fn: Transition, ttl: float) -> BreakerState | None:
        new = fn(self._states.get(key, CLEAN))  # no await in between: atomic
        if new is not None:
            self.put(key, new)
        return new

    def put(self, key: str, state: BreakerState) -> None:
        if state == CLEAN:
            self._states.pop(key, None)
            return
        self._states[key] = state
        if len(self._states) > self._max:
            # Pass-through names can make many keys: forget the healthy ones.
            self._states = {k: s for k, s in self._states.items() if s.tripped}

    def replace(self, states: dict[str, BreakerState]) -> None:
        """Take a shared store's states wholesale (absent means healthy)."""
        self._states = states


class Breakers:
    """The breakers of every target, over one store."""

    def __init__(self, store: BreakerStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock

    async def health(self, keys: Sequence[str]) -> dict[str, Health]:
        now = self._clock()
        states = await self.store.get(keys)
        return {k: health(s, now) for k, s in zip(keys, states, strict=True)}

    def health_now(self, keys: Sequence[str]) -> dict[str, Health]:
        """``health`` from what the store knows now (``peek``): no coroutine
        on the request path, the same answer."""
        states = self.store.peek(keys)
        if all(s is CLEAN for s in states):  # nearly always: no clock needed
            return dict.fromkeys(keys, "closed")
        now = self._clock()
        return {k: health(s, now) for k, s in zip(keys, states, strict=True)}

    def success_changes(self, key: str) -> bool:
        """Whether recording a success would change the target's state (a
        failure count to reset, a probe to end): when not, ``record`` has
        nothing to do (as ``update`` finds, without its coroutine)."""
        state = self.store.state(key)
        return state is not CLEAN and on_success(state) is not None

    async def acquire(self, key: str, seen: Health, lease: float) -> bool:
        """May this request use the target? A half-open target admits one
        probe at a time, for at most ``lease`` seconds."""
        if seen != "half_open":
            return True
        now = self._clock()
        return await self.store.update(key, on_probe(now, lease), ttl=lease + 60) is not None

    async def record(
        self, key: str, policy: BreakerPolicy, outcome: Verdict, may_eject: bool = True
    ) -> None:
        ttl = 2 * policy.max_cooldown_s + 60
        if outcome == "ok":
            await self.store.update(key, on_success, ttl)
        elif outcome == "neutral":
            await self.store.update(key, on_neutral, ttl)
        else:
            now = self._clock()
            await self.store.update(key, lambda s: on_failure(s, policy, now, may_eject), ttl)
