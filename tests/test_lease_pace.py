"""A background top-up (``lease_pace.top_up_soon``), for the quota, budget
and permit leases alike: the lease is marked while it runs and unmarked
however it ends; a failure is logged, an unreachable database is not; off a
running loop nothing is started."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

from proxy.core.tasks import TaskGroup
from proxy.stores import pgwait
from proxy.stores.lease_pace import top_up_soon

log = logging.getLogger("tollway.test_lease_pace")


@dataclass
class _Lease:
    topping: bool = False
    got: int = 0


async def test_a_top_up_marks_its_lease_until_it_ends() -> None:
    group, lease = TaskGroup(), _Lease()
    seen: list[bool] = []

    async def work(n: int) -> None:
        seen.append(lease.topping)
        lease.got += n

    top_up_soon(group, lease, "test", log, work, 5)
    assert lease.topping  # marked at once: no second top-up is asked for meanwhile
    await group.drain(grace=5)
    assert seen == [True] and lease.got == 5 and not lease.topping


async def test_a_failed_top_up_is_logged_and_an_unreachable_database_is_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    group, failing, down = TaskGroup(), _Lease(), _Lease()

    async def broken() -> None:
        raise RuntimeError("boom")

    async def unreachable() -> None:
        raise pgwait.DatabaseDown("no answer")

    with caplog.at_level(logging.ERROR, logger=log.name):
        top_up_soon(group, failing, "test", log, broken)
        top_up_soon(group, down, "test", log, unreachable)
        await group.drain(grace=5)
    assert not failing.topping and not down.topping
    assert [r.getMessage() for r in caplog.records] == ["background test top-up failed"]


def test_off_a_running_loop_nothing_starts() -> None:
    lease, called = _Lease(), []

    async def work() -> None:
        called.append(True)

    top_up_soon(TaskGroup(), lease, "test", log, work)
    assert not lease.topping and not called
