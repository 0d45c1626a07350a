"""``proxy.core.turns.TurnBudget``: requests whose first steps land in one loop
turn yield once the turn has run its budget, so what else is queued (a due
timer, another socket's callback) runs in between; order is kept."""

from __future__ import annotations

import asyncio
import math
import time

from proxy.core.turns import MAX_PAUSES, TurnBudget


def _spin(seconds: float) -> None:
    """A request's first step: CPU for ``seconds`` (the loop held meanwhile)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def _burst(budget: TurnBudget, n: int, step_s: float) -> tuple[int, list[int]]:
    """``n`` requests arriving in one turn, each taking a ``step_s`` first step,
    and a callback queued behind them: (how many steps ran before the
    callback, the order the steps ran in)."""
    loop = asyncio.get_running_loop()
    order: list[int] = []
    seen: list[int] = []

    async def request(i: int) -> None:
        if budget.spent():
            await budget.pause()
        _spin(step_s)
        order.append(i)

    tasks = [loop.create_task(request(i)) for i in range(n)]
    loop.call_soon(lambda: seen.append(len(order)))
    await asyncio.gather(*tasks)
    return seen[0], order


async def test_a_burst_of_first_steps_lets_a_queued_callback_in() -> None:
    ran_before, order = await _burst(TurnBudget(0.001), 20, 0.0005)
    # 1 ms of budget, 0.5 ms steps: the turn stops after 3 (the check
    # before each step; the first sets the mark), far from all 20.
    assert ran_before <= 4, f"{ran_before} first steps ran before the queued callback"
    assert order == list(range(20)), "requests overtook each other"


async def test_without_a_budget_the_burst_holds_the_loop() -> None:
    ran_before, order = await _burst(TurnBudget(math.inf), 20, 0.0005)
    assert ran_before == 20  # the control: what the budget prevents
    assert order == list(range(20))


async def test_a_request_yields_a_bounded_number_of_times() -> None:
    # A zero budget: every check after a turn's first finds it spent. Each
    # request still runs, after at most MAX_PAUSES turns of waiting.
    budget = TurnBudget(0.0)
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    loop = asyncio.get_running_loop()
    counter = loop.create_task(count_turns())
    _, order = await _burst(budget, 30, 0.0)
    counter.cancel()
    assert order == list(range(30))
    assert turns <= 30 * (MAX_PAUSES + 1)


async def test_below_saturation_nobody_waits() -> None:
    budget = TurnBudget(0.001)
    for _ in range(50):  # one request per turn: each finds a fresh turn
        assert not budget.spent()
        await asyncio.sleep(0)
