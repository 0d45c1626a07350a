"""Load balancing: the order in which the forward stage tries a plan's targets.

The router draws each model's targets in weighted random order (a weighted
draw without replacement, so any subset of it is still a weighted draw).
``arrange`` applies the live view on top, per model group and keeping the
groups in order (the requested model first, then its fallbacks):

- ``weighted`` keeps the draw;
- ``least_in_flight`` sorts by requests in flight from this process, the
  draw breaking ties;
- targets whose breaker is open are left out, unless that would leave
  nothing at all: then every target is tried, ejected or not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from proxy.stages.forward.breaker import Health
from proxy.stages.route import RoutePlan, Target


class InFlight:
    """Requests in flight per target key, streams counted until closed."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def count(self, key: str) -> int:
        return self._counts.get(key, 0)

    def enter(self, key: str, then: Callable[[], None] | None = None) -> Slot:
        """``then`` runs once when the slot is released (a provider-limit permit)."""
        self._counts[key] = self._counts.get(key, 0) + 1
        return Slot(self, key, then)

    def _leave(self, key: str) -> None:
        left = self._counts.get(key, 0) - 1
        if left > 0:
            self._counts[key] = left
        else:
            self._counts.pop(key, None)


class Slot:
    """One request's place in ``InFlight``; ``release`` is idempotent."""

    __slots__ = ("_held", "_key", "_owner", "_then")

    def __init__(self, owner: InFlight, key: str, then: Callable[[], None] | None = None) -> None:
        self._owner, self._key, self._held, self._then = owner, key, True, then

    def release(self) -> None:
        if self._held:
            self._held = False
            self._owner._leave(self._key)
            if self._then is not None:
                self._then()


def arrange(plan: RoutePlan, health: Mapping[str, Health], inflight: InFlight) -> list[Target]:
    ordered: list[Target] = []
    for group in plan.groups:
        if group.strategy == "least_in_flight":
            ordered.extend(sorted(group.targets, key=lambda t: inflight.count(t.key)))
        else:
            ordered.extend(group.targets)
    usable = [t for t in ordered if health.get(t.key) != "open"]
    return usable or ordered
