"""Retry policy at work: what may be retried, how long to wait, what comes next.

Pure logic, no I/O, so it is tested without a network:

- ``retryable`` says whether a failure before the first byte may move on:
  connect errors, resets, timeouts, 408/409/429 (429 unless switched off)
  and 5xx. Any other 4xx is the client's problem and ends the request.
- ``backoff`` is exponential with full jitter: retry *n* of a target waits
  ``U(0, min(backoff_max, backoff_base * 2**(n-1)))``.
- ``retry_after`` reads ``retry-after-ms`` or ``retry-after`` (seconds or an
  HTTP date) from a provider's error.
- ``Schedule`` decides which target goes next and when: a target not yet
  tried goes at once (failing over costs no backoff); when every target has
  been tried, the one free soonest is retried after its backoff or the
  provider's ``retry-after``, whichever is longer. A ``retry-after`` beyond
  the deadline drops that target.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Generic, TypeVar

from proxy.config.model import RetryPolicy
from proxy.core.errors import GatewayError, ProviderHTTPError, UpstreamError

T = TypeVar("T")

RETRYABLE_4XX = (408, 409, 429)


def retryable(exc: GatewayError, policy: RetryPolicy) -> bool:
    if isinstance(exc, UpstreamError):
        return True
    if not isinstance(exc, ProviderHTTPError):
        return False
    status = exc.http_status
    if status == 429:
        return policy.retry_on_429
    return status >= 500 or status in RETRYABLE_4XX


def backoff(retry: int, policy: RetryPolicy, rng: random.Random) -> float:
    """Seconds to wait before retry number ``retry`` (1-based) of a target."""
    cap = min(policy.backoff_max_ms, policy.backoff_base_ms * 2 ** (retry - 1))
    return rng.uniform(0, cap) / 1000


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The provider's requested wait in seconds, or None when absent or unreadable."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(slots=True)
class _Slot(Generic[T]):
    target: T
    tries: int = 0
    not_before: float = 0.0
    dropped: bool = False


class Schedule(Generic[T]):
    """The order of attempts over a plan's targets, on the monotonic clock."""

    def __init__(
        self, targets: Sequence[T], policy: RetryPolicy, deadline: float, rng: random.Random
    ) -> None:
        self._slots = [_Slot(t) for t in targets]
        self._policy = policy
        self._deadline = deadline
        self._rng = rng
        self.failures = 0

    def next(self, now: float) -> tuple[T, float] | None:
        """The next target and how long to wait for it; None when nothing is left."""
        for s in self._slots:  # a target not yet tried goes first, at once
            if not s.dropped and s.tries == 0:
                return s.target, 0.0
        live = [s for s in self._slots if not s.dropped]
        if not live:
            return None
        soonest = min(live, key=lambda s: s.not_before)  # min is stable: plan order on ties
        return soonest.target, max(0.0, soonest.not_before - now)

    def started(self, target: T) -> None:
        self._slot(target).tries += 1

    def failed(self, target: T, now: float, wait_hint: float | None = None) -> None:
        """Record a retryable failure; ``wait_hint`` is the provider's retry-after."""
        self.failures += 1
        slot = self._slot(target)
        delay = backoff(slot.tries, self._policy, self._rng)
        if wait_hint is not None:
            if now + wait_hint > self._deadline:
                slot.dropped = True  # it asked for longer than we may wait: move on
                return
            delay = max(delay, wait_hint)
        slot.not_before = now + delay

    def drop(self, target: T) -> None:
        self._slot(target).dropped = True

    def _slot(self, target: T) -> _Slot[T]:
        return next(s for s in self._slots if s.target is target)
