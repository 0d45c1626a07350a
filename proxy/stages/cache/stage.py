"""The exact response cache as a stage: look up before forward, keep after.

``on_request`` answers a hit itself (JSON, or an SSE replay); a miss goes on
to the provider and ``on_settle`` stores its answer in the background once
the client has it: a 200 reply, or a stream that reached ``[DONE]`` with its
client still there. The policy and the store are in ``config`` and ``store``;
the replay of stored answers is in ``replay``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.config.model import Config
from proxy.stages import parse
from proxy.stages.base import Exchange, Services, Stage
from proxy.stages.cache.config import CachePolicy, parse_cache
from proxy.stages.cache.replay import assemble, serve_hit
from proxy.stages.cache.store import Lookup, ResponseCache


class ResponseCacheStage(Stage):
    name = "cache"
    section = "cache"

    def __init__(self) -> None:
        self.store = ResponseCache(None)

    @classmethod
    def configure(cls, raw: Any, config: Config) -> CachePolicy | None:
        policy = parse_cache(raw)
        return policy if policy.active else None

    async def open(self, services: Services) -> None:
        self.store = ResponseCache(services.redis)

    async def on_request(self, ex: Exchange, settings: CachePolicy) -> web.StreamResponse | None:
        if not ex.cacheable:  # an earlier stage needs this request's own answer
            self.store.lookups["bypass"] += 1
            ex.record.cache = "bypass"
            ex.headers.update(Lookup("bypass").headers())
            return None
        found = await self.store.lookup(
            settings, ex.inbound, ex.body, ex.endpoint, ex.model, ex.scope
        )
        ex.record.cache = found.status
        ex.headers.update(found.headers())
        if found.entry is None:
            ex.notes[self.name] = found
            if found.key is not None:  # the answer is to be kept, in chat
                ex.passthrough = False
            return None
        usage_chunk = parse.wants_usage(ex.body)
        return await serve_hit(
            ex.request, found, ex.record, ex.headers, usage_chunk, ex.started, ex.door
        )

    def on_settle(self, ex: Exchange, settings: CachePolicy) -> None:
        found = ex.notes.get(self.name)
        record = ex.record
        if not isinstance(found, Lookup) or record.provider_model is None:
            return
        if ex.meter is not None:
            whole = record.status == 200 and not record.client_disconnected
            found.keep_stream(
                ex.meter, ex.body, ex.endpoint, record.provider_model, whole, assemble
            )
        elif ex.reply is not None:
            found.keep_reply(ex.reply.body, record.usage, record.status)
