"""Breaker states shared by every instance through Redis.

Reads never wait on Redis: ``get`` answers from a local mirror, which a
background sync refreshes from Redis at most every ``refresh_s`` seconds
(one ``HGETALL`` per provider the process routes to). So an ejection made by
one instance reaches the others within ``refresh_s`` (0.5 s by default) plus
a round trip.

Writes that change a state go to Redis as an optimistic transaction on the
provider's hash ``tw:br:{provider}`` (one Redis Cluster slot per provider):
read the target's field, apply the transition, and write it back with a
compare-and-set script that fails if the field changed in between (then
read again). So the transition is applied to the fleet's
current state, not to this process's possibly stale copy: failures counted
by several instances add up, and only one instance wins a half-open probe.
A transition that changes nothing in the local mirror (a success on a
healthy target: nearly every request) skips Redis altogether; the price is
that a success here does not reset failures another instance counted since
the last sync.

While Redis is down (``RedisDown``) the mirror is updated alone: breaking
goes on per process, as without Redis, and the next sync after Redis is
back replaces the mirror with the fleet's state.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Sequence

import orjson

from proxy.stages.forward.breaker import CLEAN, BreakerState, MemoryBreakerStore, Transition
from proxy.stores.redis_client import Client, RedisDown, SharedRedis

_CAS_TRIES = 5  # concurrent writers to one target: each loser reads again

# The field as it was read ('' when absent) is still there: write the new
# state ('' deletes it) and refresh the hash's TTL. A script, not
# WATCH/MULTI, so it runs the same on a Redis Cluster (one key, one slot).
_CAS_LUA = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if (cur or '') ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""


class _Contended(Exception):
    """Lost every compare-and-set race: not a Redis fault, so Redis is not marked down."""


@functools.lru_cache(maxsize=4096)  # asked for every target of every request
def _hash(target: str) -> str:
    provider = target.split("/", 1)[0]
    return f"tw:br:{{{provider}}}"


def _encode(state: BreakerState) -> bytes:
    return orjson.dumps(
        [state.failures, state.tripped, state.ejections, state.open_until, state.probe_until]
    )


def _decode(raw: bytes | str | None) -> BreakerState:
    if raw is None:
        return CLEAN
    try:
        f, t, e, o, p = orjson.loads(raw)
        return BreakerState(int(f), bool(t), int(e), float(o), float(p))
    except (ValueError, TypeError):
        return CLEAN  # an unreadable entry counts as healthy; the next write fixes it


class RedisBreakerStore:
    def __init__(self, redis: SharedRedis, refresh_s: float = 0.5) -> None:
        self.redis = redis
        self.refresh_s = refresh_s
        self.local = MemoryBreakerStore()
        self._hashes: set[str] = set()  # providers this process has asked about
        self._synced = 0.0
        self._syncing = False
        self._ttl = 60  # seconds a hash lives after its last write; grows with policies
        self._cas = redis.script(_CAS_LUA)

    async def get(self, keys: Sequence[str]) -> list[BreakerState]:
        return self.peek(keys)

    def peek(self, keys: Sequence[str]) -> list[BreakerState]:
        """The mirror's states; a sync is started when one is due."""
        for key in keys:
            self._hashes.add(_hash(key))
        if not self._syncing and time.monotonic() - self._synced >= self.refresh_s:
            self._syncing = True
            self.redis.spawn(self.sync(), name="breaker-sync")
        return self.local.peek(keys)

    def state(self, key: str) -> BreakerState:
        """The mirror's (``update`` starts from it too)."""
        return self.local.state(key)

    async def sync(self) -> None:
        """Replace the mirror's states of every known provider with Redis's."""
        try:
            names = sorted(self._hashes)

            async def fetch(client: Client) -> list[dict[bytes, bytes]]:
                async with client.pipeline(transaction=False) as pipe:
                    for name in names:
                        pipe.hgetall(name)
                    return list(await pipe.execute())

            hashes = await self.redis.call(fetch)
            states: dict[str, BreakerState] = {}
            for fields in hashes:
                for field, raw in fields.items():
                    state = _decode(raw)
                    if state != CLEAN:
                        states[field.decode()] = state
            self.local.replace(states)
        finally:
            self._synced = time.monotonic()
            self._syncing = False

    async def update(self, key: str, fn: Transition, ttl: float) -> BreakerState | None:
        (seen,) = await self.local.get([key])
        if fn(seen) is None:
            return None  # no change from here: no reason to bother Redis
        self._ttl = max(self._ttl, int(ttl) + 1)
        try:
            new = await self.redis.call(lambda client: self._transact(client, key, fn))
        except (RedisDown, _Contended):
            return await self.local.update(key, fn, ttl)  # per process until Redis is back
        self.local.put(key, new[1] if new[1] is not None else new[0])
        return new[1]

    async def _transact(
        self, client: Client, key: str, fn: Transition
    ) -> tuple[BreakerState, BreakerState | None]:
        """``fn`` applied to the fleet's state; (state now, new or None)."""
        name = _hash(key)
        for attempt in range(_CAS_TRIES):
            raw = await client.hget(name, key)
            current = _decode(raw)
            new = fn(current)
            if new is None:
                return current, None
            value = b"" if new == CLEAN else _encode(new)
            args = [key, raw or b"", value, self._ttl]
            if await self._cas(keys=[name], args=args, client=client):
                return new, new
            await asyncio.sleep(0.001 * attempt)
        raise _Contended
