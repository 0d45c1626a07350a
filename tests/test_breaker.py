"""The circuit breaker's state machine, on a clock the test controls."""

from __future__ import annotations

import pytest

from proxy.config.model import BreakerPolicy
from proxy.core.errors import InvalidRequest, ProviderHTTPError, UpstreamTimeout
from proxy.stages.forward.breaker import (
    CLEAN,
    Breakers,
    BreakerState,
    MemoryBreakerStore,
    health,
    on_failure,
    on_success,
    verdict,
)

POLICY = BreakerPolicy(failures=3, cooldown_s=10, max_cooldown_s=60)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def breakers(clock: Clock) -> Breakers:
    return Breakers(MemoryBreakerStore(), clock=clock)


async def _h(b: Breakers) -> str:
    return (await b.health(["t"]))["t"]


async def _fail(b: Breakers, n: int = 1, may_eject: bool = True) -> None:
    for _ in range(n):
        await b.record("t", POLICY, "failure", may_eject)


async def test_opens_after_n_consecutive_failures(breakers: Breakers) -> None:
    await _fail(breakers, 2)
    assert await _h(breakers) == "closed"
    await breakers.record("t", POLICY, "ok")  # a success resets the count
    await _fail(breakers, 2)
    assert await _h(breakers) == "closed"
    await _fail(breakers)
    assert await _h(breakers) == "open"


async def test_cools_down_half_opens_admits_one_probe_and_closes(
    breakers: Breakers, clock: Clock
) -> None:
    await _fail(breakers, 3)
    clock.now += 9.9
    assert await _h(breakers) == "open"
    clock.now += 0.2
    assert await _h(breakers) == "half_open"
    assert await breakers.acquire("t", "half_open", lease=5)
    assert not await breakers.acquire("t", "half_open", lease=5)  # one probe at a time
    assert await _h(breakers) == "open"  # others keep away while it probes
    await breakers.record("t", POLICY, "ok")
    assert await _h(breakers) == "closed"


async def test_probe_lease_expires_if_the_probe_never_reports(
    breakers: Breakers, clock: Clock
) -> None:
    await _fail(breakers, 3)
    clock.now += 10
    assert await breakers.acquire("t", "half_open", lease=5)
    clock.now += 5
    assert await breakers.acquire("t", "half_open", lease=5)


async def test_cooldown_doubles_with_repeated_ejections_up_to_the_cap(
    breakers: Breakers, clock: Clock
) -> None:
    await _fail(breakers, 3)
    cooldowns = []
    for _ in range(4):
        state = (await breakers.store.get(["t"]))[0]
        cooldowns.append(state.open_until - clock.now)
        clock.now = state.open_until
        assert await breakers.acquire("t", "half_open", lease=5)
        await _fail(breakers)  # the probe fails: ejected again
    assert cooldowns == [10, 20, 40, 60]


async def test_cooldown_starts_over_after_a_long_healthy_spell(
    breakers: Breakers, clock: Clock
) -> None:
    await _fail(breakers, 3)
    clock.now += 10
    await breakers.record("t", POLICY, "ok")  # probe succeeded
    await _fail(breakers, 3)  # soon after: the second ejection is twice as long
    assert (await breakers.store.get(["t"]))[0].ejections == 2
    clock.now += 30
    await breakers.record("t", POLICY, "ok")
    clock.now += 61  # healthy for longer than max_cooldown_s
    await _fail(breakers, 3)
    state = (await breakers.store.get(["t"]))[0]
    assert state.ejections == 1 and state.open_until - clock.now == 10


async def test_last_healthy_target_is_not_ejected(breakers: Breakers) -> None:
    await _fail(breakers, 10, may_eject=False)
    assert await _h(breakers) == "closed"


def test_half_open_probe_failure_without_siblings_closes_instead() -> None:
    state = BreakerState(failures=3, tripped=True, ejections=1, open_until=5.0)
    after = on_failure(state, POLICY, now=6.0, may_eject=False)
    assert after is not None and health(after, 6.0) == "closed"


def test_what_counts_as_a_failure() -> None:
    assert verdict(None, POLICY) == "ok"
    assert verdict(ProviderHTTPError(500, {}), POLICY) == "failure"
    assert verdict(UpstreamTimeout("x"), POLICY) == "failure"
    assert verdict(ProviderHTTPError(400, {}), POLICY) == "ok"  # the provider works
    assert verdict(ProviderHTTPError(429, {}), POLICY) == "neutral"
    assert verdict(ProviderHTTPError(429, {}), BreakerPolicy(trip_on_429=True)) == "failure"
    assert verdict(InvalidRequest("x"), POLICY) == "neutral"


async def test_memory_store_forgets_healthy_targets() -> None:
    store = MemoryBreakerStore(max_entries=3)
    for key in "abcd":
        await store.update(key, lambda s: BreakerState(failures=1), ttl=1)
    await store.update("e", lambda s: BreakerState(tripped=True, open_until=9e9), ttl=1)
    assert await store.get(["a", "e"]) == [CLEAN, BreakerState(tripped=True, open_until=9e9)]
    await store.update("e", on_success, ttl=1)
    assert on_success(CLEAN) is None  # nothing to write for a healthy target


async def test_the_request_paths_reads_agree_with_the_stores(
    breakers: Breakers, clock: Clock
) -> None:
    """``health_now`` (no coroutine) answers what ``health`` does, and
    ``success_changes`` says whether recording a success would change a
    state: the forward stage skips ``record`` only when it would not."""
    keys = ["t", "u", "v"]
    assert breakers.health_now(keys) == await breakers.health(keys) == dict.fromkeys(keys, "closed")
    assert not breakers.success_changes("t")  # a healthy target: nothing to record
    await _fail(breakers)  # one failure counted
    assert breakers.success_changes("t")
    await _fail(breakers, 2)  # ejected
    assert breakers.health_now(keys) == await breakers.health(keys)
    assert breakers.health_now(keys)["t"] == "open"
    clock.now += 11  # cooled down: half-open
    assert breakers.health_now(keys) == await breakers.health(keys)
    assert breakers.health_now(["t"]) == {"t": "half_open"}
    assert await breakers.acquire("t", "half_open", lease=5)
    assert breakers.success_changes("t")  # the probe's success closes it
    await breakers.record("t", POLICY, "ok")
    assert not breakers.success_changes("t")
    assert breakers.health_now(["t"]) == {"t": "closed"}
