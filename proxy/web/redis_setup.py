"""Opening and closing the Redis-backed parts as one ``cleanup_ctx`` resource.

Without Redis (no ``RedisOptions``: tests, or a gateway built without it)
the rate limiter and the circuit breakers run per process only and the
response cache stores nothing.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from proxy.stages.forward.breaker import Breakers
from proxy.stages.forward.breaker_redis import RedisBreakerStore
from proxy.stages.forward.provider_limits import ProviderGate
from proxy.stores.ratelimit import RateLimiter
from proxy.stores.redis_client import RedisOptions, SharedRedis
from proxy.web.keys import LIMITER, REDIS, UPSTREAMS

log = logging.getLogger("tollway.redis")


def redis_ctx(opts: RedisOptions | None) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        redis = SharedRedis(opts) if opts is not None else None
        if redis is None:
            log.info("no Redis configured: per-process rate limits, no response cache")
        else:
            app[REDIS] = redis
            await redis.ping()  # a Redis down at start is logged and probed, not fatal
        app[LIMITER] = limiter = RateLimiter(redis)
        app[UPSTREAMS].gate = ProviderGate(limiter)
        if redis is not None:  # ejections seen by every instance
            app[UPSTREAMS].breakers = Breakers(RedisBreakerStore(redis))
        try:
            yield
        finally:
            if redis is not None:
                await redis.close()

    return ctx
