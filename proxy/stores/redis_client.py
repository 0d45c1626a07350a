"""The shared Redis client, with a health flag that keeps requests fast.

Redis holds what is shared but is not money (rate-limit windows, the
response cache, provider limits), so Redis failing never fails a request:
every command runs with a short socket timeout (50 ms by default) and no
retries, and the first failure or timeout marks Redis down. While it is
down nothing waits on it — ``call`` raises ``RedisDown`` at once and callers
take their fallback (per-process rate limits, cache miss) — and a probe pings
it every ``probe_interval_s`` until it answers, so Redis coming back is
picked up without a restart. Each transition is one log line; ``errors``,
``outages`` and ``up`` are the numbers a metrics exporter reads.

With a Redis Cluster URL (``redis_url.py``) the client is redis-py's
``RedisCluster``: every key Tollway writes carries a ``{hash tag}``, so each
Lua script and transaction touches one slot. One node failing marks the
whole client down (the same fallback as a standalone Redis going away), and
the probe then pings every primary: Redis counts as back once the cluster
answers on all its slots again — after the failed primary's replica took
over, or the primary returned.

This is the only module that sees redis-py exceptions; everything else sees
``RedisDown``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisClusterException, RedisError

from proxy.core.tasks import TaskGroup
from proxy.stores.embedded import DatastoreError
from proxy.stores.redis_url import cluster_url

log = logging.getLogger("tollway.redis")
T = TypeVar("T")
# RedisClusterException is not a RedisError: it is what the cluster client
# raises when no node answers at discovery.
_FAULTS = (RedisError, RedisClusterException, OSError, TimeoutError)

Client = Redis | RedisCluster


class RedisDown(Exception):
    """Redis is unreachable or too slow right now: use the fallback."""


@dataclass(frozen=True, slots=True)
class RedisOptions:
    url: str
    timeout_s: float = 0.05  # per socket operation: connect, write, read
    probe_interval_s: float = 0.5

    @classmethod
    def from_env(cls, url: str) -> RedisOptions:
        """``TOLLWAY_REDIS_TIMEOUT_MS``: the per-operation timeout (50 ms), for
        a Redis farther away than the same rack or zone."""
        raw = os.environ.get("TOLLWAY_REDIS_TIMEOUT_MS")
        if not raw:
            return cls(url)
        try:
            ms = float(raw)
        except ValueError:
            ms = 0.0
        if not 0 < ms <= 60_000:
            raise DatastoreError(
                f"TOLLWAY_REDIS_TIMEOUT_MS must be a number of ms in (0, 60000], not {raw!r}"
            )
        return cls(url, timeout_s=ms / 1000)


class SharedRedis:
    def __init__(self, opts: RedisOptions) -> None:
        self.opts = opts
        self.client: Client = open_client(opts)
        self.cluster = isinstance(self.client, RedisCluster)
        self.up = True
        self.errors = 0  # commands that failed or timed out
        self.outages = 0  # times Redis was marked down
        self._down_at = 0.0
        self._tasks = TaskGroup()
        self._probe_task: asyncio.Task[None] | None = None

    def script(self, lua: str) -> AsyncScript:
        """A Lua script run by EVALSHA, loaded again if the script cache was
        flushed (redis-py's ``AsyncScript`` handles NOSCRIPT)."""
        return self.client.register_script(lua)

    async def call(self, fn: Callable[[Client], Awaitable[T]]) -> T:
        if not self.up:
            raise RedisDown
        try:
            if self.cluster:
                await self._discover()
            return await fn(self.client)
        except _FAULTS as exc:
            self._fault(exc)
            raise RedisDown from None

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        """Background Redis work (cache writes, releases): held, drained at close."""
        self._tasks.spawn(_quiet(coro), name=name)

    async def settled(self, limit: float = 2.0) -> None:
        """Wait (up to ``limit`` s) for the background work spawned so far,
        the probe aside: a cache store is in Redis once this returns."""
        pending = self._tasks.running() - {self._probe_task}
        if pending:
            await asyncio.wait(pending, timeout=limit)

    async def _discover(self) -> None:
        """The slot map, before the first command (and again after a fault):
        redis-py routes a command sent before it has one to a random primary,
        and the MOVED replies of a burst of those make it drop every
        connection, in-flight ones included. A no-op once discovered."""
        assert isinstance(self.client, RedisCluster)
        await self.client.initialize()

    async def _ping(self) -> None:
        if isinstance(self.client, RedisCluster):
            await self._discover()
            await self.client.ping(target_nodes=RedisCluster.PRIMARIES)
        else:
            await self.client.ping()

    async def ping(self) -> bool:
        try:
            await self._ping()
        except _FAULTS as exc:
            self._fault(exc)
            return False
        return True

    def _fault(self, exc: BaseException) -> None:
        self.errors += 1
        if not self.up:
            return
        self.up = False
        self.outages += 1
        self._down_at = time.monotonic()
        log.warning(
            "redis unreachable (%s): per-process rate limits, cache off, until it answers",
            type(exc).__name__,
        )
        self._probe_task = self._tasks.spawn(self._probe(), name="redis-probe")

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(self.opts.probe_interval_s)
            try:
                await self._ping()
            except _FAULTS:
                self.errors += 1
                continue
            self.up = True
            log.warning("redis is back after %.1fs", time.monotonic() - self._down_at)
            return

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
        await self._tasks.drain(grace=2)
        try:
            await self.client.aclose()
        except (RedisError, OSError, TimeoutError) as exc:
            # Closing is best effort: on a loaded machine a socket may not
            # close within the 50 ms timeout, which must not fail a shutdown.
            log.debug("closing the Redis client: %s", exc)


def open_client(opts: RedisOptions) -> Client:
    """No retries anywhere (a retry would make a request wait on Redis), no
    health checks: a fault surfaces at once and the probe takes over."""
    common: dict[str, Any] = {
        "socket_timeout": opts.timeout_s,
        "socket_connect_timeout": opts.timeout_s,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    cluster = cluster_url(opts.url)
    if cluster is None:
        return Redis.from_url(opts.url, **common)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in cluster.nodes],
        username=cluster.username,
        password=cluster.password,
        ssl=cluster.tls,
        **common,
    )


async def _quiet(coro: Coroutine[Any, Any, Any]) -> None:
    try:
        await coro
    except RedisDown:
        pass  # already counted and logged
