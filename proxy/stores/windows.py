"""What a rate-limit check decides, shared by the Redis limiter and its
per-process fallback (``ratelimit`` and ``local_limits``).

Windows are sliding logs of ``SLOTS`` slots: an hour in 6 s slots, a minute
in 100 ms slots.
"""

from __future__ import annotations

from dataclasses import dataclass

SLOTS = 600
HOUR_MS = 3_600_000
MINUTE_MS = 60_000


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit a request must pass. All limits checked together must share
    a Redis Cluster hash tag in ``key`` (``tw:rl:{key_id}:rph``)."""

    key: str
    name: str  # what the client is told: "requests_per_hour", "tokens_per_minute", "rpm", ...
    capacity: int
    window_ms: int = 0  # a multiple of SLOTS; 0 for a concurrency limit
    cost: int = 1  # units this request takes (its tokens, for a token limit)
    member: str = ""  # concurrency: who holds the slot
    lease_ms: int = 0  # concurrency: the slot frees itself after this

    @property
    def concurrency(self) -> bool:
        return self.window_ms == 0


@dataclass(frozen=True, slots=True)
class Window:
    """A limit's state after the check (after the commit, when admitted)."""

    limit: Limit
    capacity: int  # in effect: the fallback's share while Redis is down
    fits: bool
    used: int
    reset_ms: int  # until the oldest counted unit leaves the window (0: empty)
    retry_ms: int  # refused: until this request would fit; -1: never (cost > capacity)

    @property
    def remaining(self) -> int:
        return max(0, self.capacity - self.used)


@dataclass(frozen=True, slots=True)
class Verdict:
    admitted: bool
    windows: tuple[Window, ...]
    now_ms: int  # the clock that decided: Redis's, or this process's in the fallback
    shared: bool  # decided in Redis (False: by the per-process fallback)

    @property
    def blocking(self) -> Window | None:
        """The limit that refused the request (the longest wait, if several did)."""
        refused = [w for w in self.windows if not w.fits]
        if not refused:
            return None
        return max(refused, key=lambda w: w.retry_ms if w.retry_ms >= 0 else 1 << 62)

    def window(self, name: str) -> Window | None:
        return next((w for w in self.windows if w.limit.name == name), None)
