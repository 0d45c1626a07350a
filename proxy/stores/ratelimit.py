"""Shared limits: sliding windows and concurrency slots, in one Lua script.

The algorithm is a **sliding log at slot resolution**: a window of length W
is cut into 600 slots of W/600 (6 s for an hour, 100 ms for a minute); a
Redis hash per limit keeps the units admitted in each slot plus their sum.
A request is admitted when the units in the current slot and the 600 before
it, plus its own cost, fit the capacity. Time is the Redis server's
(``TIME``), so clock skew between Tollway instances does not matter.

**The exact bound.** Any rolling interval of length W holds at most
``capacity`` units — never N+1 requests in any rolling hour for a limit of N
per hour, across all workers and instances. (Proof: when the last request of
such an interval was admitted at time t, every earlier request of the
interval happened at or after t - W, so in a slot the check counted.) The
price of the bound is that a unit is forgotten between W and W + W/600 after
it was admitted: a client that used all N requests at one instant gets its
next one between 60m0s and 60m6s later, never before 60m0s.

GCRA and the two-bucket sliding-window estimate were rejected: GCRA with a
burst of N lets 2N-1 through in a rolling hour, and the estimate is only
exact when traffic is even. A per-request log would be exact too, but holds
N entries per key (a million for the ``unlimited`` tier); the slots hold at
most 601 small fields whatever N is.

One script call checks every limit of a request and commits only if all
pass, so a request refused by one limit consumes no other. Each hash is
pruned as its slots age (amortised O(1) per request) and has a TTL of one
window. A concurrency limit is a sorted set of holders scored by lease
expiry, so a crashed holder frees its slot when its lease ends.

A window check may also lease units to the worker (``permits.py``): they
are committed with the request, in the same slot, and unused ones are given
back to that slot by a later call, so the bound above holds for leased
units as for single ones.

When Redis is down (``RedisDown``) the same checks run on a per-process
``LocalLimiter`` with ``capacity // expected_instances`` (at least 1); see
``proxy/stores/local_limits.py`` for what that guarantees.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from proxy.stores.local_limits import LocalLimiter
from proxy.stores.redis_client import Client, RedisDown, SharedRedis
from proxy.stores.windows import SLOTS, Limit, Verdict, Window

_LUA = """
local SLOTS = 600
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function window(key, cap, slot, cost)
  local cur = math.floor(now / slot)
  local oldest = cur - SLOTS
  local meta = redis.call('HMGET', key, 'sum', 'low')
  local sum, low = tonumber(meta[1]), tonumber(meta[2])
  if sum == nil or low == nil or low + SLOTS < oldest then
    if sum ~= nil then redis.call('DEL', key) end
    sum, low = 0, cur
  else
    -- Drop slots that left the window; move low to the oldest live slot.
    local s = low
    while s <= cur do
      local v = tonumber(redis.call('HGET', key, s))
      if v then
        if s >= oldest then break end
        sum = sum - v
        redis.call('HDEL', key, s)
      end
      s = s + 1
    end
    if sum <= 0 then
      redis.call('DEL', key)
      sum, low = 0, cur
    elseif s ~= low then
      low = s
      redis.call('HSET', key, 'sum', sum, 'low', low)
    end
  end
  local reset = 0
  if sum > 0 then reset = (low + SLOTS + 1) * slot - now end
  if sum + cost <= cap then return {1, sum, reset, 0} end
  local retry = -1
  if cost <= cap then
    local need = sum + cost - cap
    local s = low
    while s < cur do
      local v = tonumber(redis.call('HGET', key, s))
      if v then
        need = need - v
        if need <= 0 then break end
      end
      s = s + 1
    end
    retry = (s + SLOTS + 1) * slot - now
  end
  return {0, sum, reset, retry}
end

-- A lease: up to `extra` more units, counted now in the current slot, at
-- most 1/16 of what is left beyond this request (single units near the cap).
local function take_window(key, cap, slot, cost, extra, r)
  local grant = 0
  if extra > 0 then grant = math.max(0, math.min(extra, math.floor((cap - r[2] - cost) / 16))) end
  local units = cost + grant
  r[5] = grant
  if units <= 0 then return end
  local cur = math.floor(now / slot)
  redis.call('HINCRBY', key, cur, units)
  redis.call('HINCRBY', key, 'sum', units)
  redis.call('HSETNX', key, 'low', cur)
  redis.call('PEXPIRE', key, (SLOTS + 2) * slot)
  if r[2] == 0 then r[3] = (cur + SLOTS + 1) * slot - now end
  r[2] = r[2] + units
end

-- The unused part of a lease, back into the slot it was counted in (if that
-- slot is still in the window: once pruned, it no longer counts anyway).
local function give_back(key, slot, n)
  if n <= 0 then return end
  local v = tonumber(redis.call('HGET', key, slot))
  if not v then return end
  n = math.min(n, v)
  if v == n then redis.call('HDEL', key, slot) else redis.call('HINCRBY', key, slot, -n) end
  redis.call('HINCRBY', key, 'sum', -n)
end

local function slots(key, cap)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local used = redis.call('ZCARD', key)
  if used < cap then return {1, used, 0, 0} end
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return {0, used, 0, math.max(1, tonumber(first[2]) - now)}
end

local function take_slot(key, lease, member, r)
  redis.call('ZADD', key, now + lease, member)
  if redis.call('PTTL', key) < lease then redis.call('PEXPIRE', key, lease + 1000) end
  r[2] = r[2] + 1
end

local commit = ARGV[1] == 'commit'
local admitted = 1
local results = {}
for i = 1, #KEYS do
  local a = i * 7 - 5
  local r
  if ARGV[a] == 'w' then
    give_back(KEYS[i], ARGV[a + 5], tonumber(ARGV[a + 6]))
    r = window(KEYS[i], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]))
  else
    r = slots(KEYS[i], tonumber(ARGV[a + 1]))
  end
  r[5] = 0
  if r[1] == 0 then admitted = 0 end
  results[i] = r
end
local out = {now, admitted}
for i = 1, #KEYS do
  local a = i * 7 - 5
  local r = results[i]
  if admitted == 1 and commit then
    if ARGV[a] == 'w' then
      local cap, slot = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
      take_window(KEYS[i], cap, slot, tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), r)
    else
      take_slot(KEYS[i], tonumber(ARGV[a + 2]), ARGV[a + 3], r)
    end
  end
  for j = 1, 5 do out[#out + 1] = r[j] end
end
return out
"""


@dataclass(frozen=True, slots=True)
class LeaseAsk:
    """What a window limit's check also asks for: ``extra`` units leased
    beyond the request's cost, and ``back`` unused units returned to
    ``slot`` (the slot they were leased in)."""

    extra: int = 0
    slot: int = 0
    back: int = 0


_NO_LEASE = LeaseAsk()


def check_args(
    limits: Sequence[Limit], commit: bool, asks: Sequence[LeaseAsk] = ()
) -> list[str | int]:
    args: list[str | int] = ["commit" if commit else "peek"]
    for i, lim in enumerate(limits):
        if lim.concurrency:
            args += ["c", lim.capacity, lim.lease_ms, lim.member, 0, 0, 0]
        else:
            assert lim.window_ms % SLOTS == 0, "a window must be a multiple of 600 ms"
            ask = asks[i] if asks else _NO_LEASE
            args += ["w", lim.capacity, lim.window_ms // SLOTS, lim.cost]
            args += [ask.extra, ask.slot, ask.back]
    return args


def parse_reply(limits: Sequence[Limit], reply: Sequence[int]) -> tuple[Verdict, list[int]]:
    """The verdict, and the units leased beyond each limit's cost."""
    windows, grants = [], []
    for i, lim in enumerate(limits):
        fits, used, reset, retry, grant = reply[2 + 5 * i : 7 + 5 * i]
        windows.append(Window(lim, lim.capacity, bool(fits), used, reset, retry))
        grants.append(int(grant))
    return Verdict(bool(reply[1]), tuple(windows), int(reply[0]), shared=True), grants


class RateLimiter:
    """Checks limits in Redis, or on the per-process fallback when it is down."""

    def __init__(self, redis: SharedRedis | None) -> None:
        self.redis = redis
        self.local = LocalLimiter()
        self._script = redis.script(_LUA) if redis is not None else None
        self.rejections: Counter[str] = Counter()  # by limit name
        self.fallbacks = 0  # checks answered by the per-process limiter

    async def check(
        self, limits: Sequence[Limit], instances: int = 1, *, commit: bool = True
    ) -> Verdict:
        """``commit=False`` only reports (for ``GET /v1/usage``)."""
        return (await self.check_leasing(limits, instances, (), commit=commit))[0]

    async def check_leasing(
        self,
        limits: Sequence[Limit],
        instances: int,
        asks: Sequence[LeaseAsk],
        *,
        commit: bool = True,
    ) -> tuple[Verdict, list[int]]:
        """``check``, asking each window for a lease (``permits.py``): also
        the units granted beyond the cost (all 0 in the fallback)."""
        found = None
        if self.redis is not None and self._script is not None:
            script, keys, args = (
                self._script,
                [lim.key for lim in limits],
                check_args(limits, commit, asks),
            )
            try:
                reply = await self.redis.call(partial(_evalsha, script, keys, args))
                found = parse_reply(limits, reply)
            except RedisDown:
                pass
        if found is None:
            self.fallbacks += 1
            found = self.local.check(limits, instances, commit=commit), [0] * len(limits)
        blocking = found[0].blocking
        if commit and blocking is not None:
            self.rejections[blocking.limit.name] += 1
        return found

    def release(self, verdict: Verdict) -> None:
        """Give back the concurrency slots an admitted request holds."""
        held = [w.limit for w in verdict.windows if w.limit.concurrency]
        if not held:
            return
        if not verdict.shared or self.redis is None:
            self.local.release(held)
            return
        redis = self.redis

        async def release() -> None:
            for lim in held:
                await redis.call(partial(_zrem, lim.key, lim.member))

        redis.spawn(release(), name="release-slots")


async def _evalsha(
    script: AsyncScript, keys: list[str], args: list[str | int], client: Client
) -> Any:
    """``script(keys=keys, args=args, client=client)``: EVALSHA, loading the
    script again on NOSCRIPT (a flushed script cache, another node), as
    redis-py's ``AsyncScript`` does, without its per-call check of the
    client against its ``Pipeline`` protocol (a ``typing.Protocol``
    isinstance that walks the protocol's members: more Python than the rest
    of the call). The client here is never a pipeline."""
    try:
        return await client.evalsha(script.sha, len(keys), *keys, *args)
    except NoScriptError:
        script.sha = await client.script_load(script.script)
        return await client.evalsha(script.sha, len(keys), *keys, *args)


async def _zrem(key: str, member: str, client: Client) -> None:
    await client.zrem(key, member)
