"""Strategies and in-flight counts: the order in which a plan is tried."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import yaml

from proxy.pipeline.registry import parse_config
from proxy.stages.forward.balance import InFlight, arrange
from proxy.stages.route import Router

CFG: dict[str, Any] = {
    "providers": {
        p: {"kind": "openai", "base_url": f"http://127.0.0.1:{i}/v1"}
        for i, p in enumerate("abc", start=1)
    },
    "models": [
        {
            "name": "w",
            "targets": [
                {"provider": p, "model": "m", "weight": w}
                for p, w in zip("abc", (6, 3, 1), strict=True)
            ],
            "fallbacks": ["lif"],
        },
        {
            "name": "lif",
            "strategy": "least_in_flight",
            "targets": [{"provider": p, "model": "n"} for p in "abc"],
        },
    ],
}


def _router(seed: int = 1) -> Router:
    return Router(parse_config(yaml.safe_dump(CFG), {}), rng=random.Random(seed))


def test_weighted_keeps_the_draw_and_groups_stay_in_order() -> None:
    router, inflight = _router(), InFlight()
    firsts: Counter[str] = Counter()
    for _ in range(3000):
        order = arrange(router.plan("w", {}), {}, inflight)
        assert [t.model for t in order] == ["m"] * 3 + ["n"] * 3
        firsts[order[0].provider.name] += 1
    assert 0.56 < firsts["a"] / 3000 < 0.64 and 0.07 < firsts["c"] / 3000 < 0.13


def test_least_in_flight_prefers_the_idlest_target() -> None:
    router, inflight = _router(), InFlight()
    held = [inflight.enter("a/n"), inflight.enter("a/n"), inflight.enter("b/n")]
    for _ in range(50):
        order = [t.key for t in arrange(router.plan("lif", {}), {}, inflight)]
        assert order == ["c/n", "b/n", "a/n"]
    for slot in held:
        slot.release()
        slot.release()  # idempotent
    assert inflight.count("a/n") == inflight.count("b/n") == 0


def test_least_in_flight_ties_follow_the_seeded_draw() -> None:
    orders = {
        tuple(t.key for t in arrange(_router(9).plan("lif", {}), {}, InFlight())) for _ in range(3)
    }
    assert len(orders) == 1


def test_ejected_targets_are_left_out_unless_nothing_else_is_left() -> None:
    plan, inflight = _router().plan("w", {}), InFlight()
    order = arrange(plan, {"a/m": "open", "b/n": "open", "c/m": "half_open"}, inflight)
    assert {t.key for t in order} == {"b/m", "c/m", "a/n", "c/n"}
    everything_open = {t.key: "open" for t in plan.targets}
    assert len(arrange(plan, everything_open, inflight)) == 6  # try them all anyway
