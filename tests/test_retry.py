"""Retry policy: what is retryable, backoff with full jitter, retry-after, the schedule."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from proxy.config.model import RetryPolicy
from proxy.core.errors import (
    InvalidRequest,
    ProviderHTTPError,
    UpstreamConnectError,
    UpstreamStreamBroken,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.stages.forward.retry import Schedule, backoff, retry_after, retryable

POLICY = RetryPolicy(max_attempts=5, backoff_base_ms=100, backoff_max_ms=1000, deadline_s=10)


def _http(status: int, **headers: str) -> ProviderHTTPError:
    return ProviderHTTPError(status, {"message": "x"}, headers=headers)


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504, 529])
def test_retryable_statuses(status: int) -> None:
    assert retryable(_http(status), POLICY)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_other_4xx_are_not_retried(status: int) -> None:
    assert not retryable(_http(status), POLICY)


def test_transport_failures_are_retried_and_429_can_be_switched_off() -> None:
    for exc in (
        UpstreamConnectError("x"),
        UpstreamUnavailable("x"),
        UpstreamTimeout("x"),
        UpstreamStreamBroken("x"),
    ):
        assert retryable(exc, POLICY)
    assert not retryable(InvalidRequest("x"), POLICY)
    no_429 = RetryPolicy(retry_on_429=False)
    assert not retryable(_http(429), no_429) and retryable(_http(503), no_429)


def test_backoff_is_full_jitter_capped_and_seeded() -> None:
    rng = random.Random(1)
    for retry, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        waits = [backoff(retry, POLICY, rng) for _ in range(500)]
        assert 0 <= min(waits) < cap * 0.1 and cap * 0.9 < max(waits) <= cap
    assert [backoff(2, POLICY, random.Random(7)) for _ in range(3)] == [
        backoff(2, POLICY, random.Random(7)) for _ in range(3)
    ]


def test_retry_after_forms() -> None:
    assert retry_after({"retry-after-ms": "250"}) == 0.25
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25  # ms wins
    assert retry_after({"retry-after": "7"}) == 7.0
    assert retry_after({"retry-after": "1.5"}) == 1.5
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    date = format_datetime(datetime(2025, 1, 1, 12, 0, 30, tzinfo=UTC), usegmt=True)
    assert retry_after({"retry-after": date}, now=now.timestamp()) == 30.0
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({"retry-after-ms": "-5"}) == 0.0
    assert retry_after({}) is None


def test_schedule_fails_over_at_once_then_backs_off() -> None:
    targets = ["a", "b"]
    sched = Schedule(targets, POLICY, deadline=100.0, rng=random.Random(3))
    assert sched.next(0.0) == ("a", 0.0)
    sched.started("a")
    sched.failed("a", 0.0)
    assert sched.next(0.0) == ("b", 0.0)  # an untried target: no backoff
    sched.started("b")
    sched.failed("b", 0.0)
    target, wait = sched.next(0.0)  # both tried: the one free soonest, after its backoff
    assert target in targets and 0 <= wait <= 0.1


def test_schedule_honours_retry_after_and_drops_what_is_beyond_the_deadline() -> None:
    sched = Schedule(["a"], POLICY, deadline=10.0, rng=random.Random(3))
    sched.started("a")
    sched.failed("a", 1.0, wait_hint=2.0)
    assert sched.next(1.0) == ("a", 2.0)
    sched.started("a")
    sched.failed("a", 3.0, wait_hint=8.0)  # 3 + 8 > 10: do not wait, move on
    assert sched.next(3.0) is None
