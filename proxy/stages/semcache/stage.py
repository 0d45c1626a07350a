"""The semantic cache as a stage, right after the exact cache (which is cheaper).

``on_request``: a chat request whose namespace (``namespace``) has a stored
answer for a last user message at least ``threshold`` similar is answered
from it, replayed as JSON or SSE by the exact cache's code and billed by
``hit_billing``; ``x-tollway-cache: semantic-hit`` and
``x-tollway-cache-similarity`` say so. Anything going wrong on the way (no
database, the embedding call failing or slower than ``embedding_timeout_s``,
Postgres slow or down) makes the request a miss, never an error.

``on_settle``: a miss's whole answer (a 200 reply, or a stream that reached
``[DONE]`` with its client) is stored in the background with the vector
already computed. A background sweeper deletes expired rows and each
tenant's least recently used rows past ``max_entries_per_tenant``, with the
cap and interval of the live config (a reload applies within a second).

What each request did is left in ``record.extra["semantic_cache"]`` for the
metrics and the usage row: result, similarity, embedding seconds, saved USD.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiohttp import web

from proxy.config.model import Config
from proxy.core.pricing import price_usage
from proxy.core.tasks import TaskGroup
from proxy.stages import parse
from proxy.stages.base import Embedder, Exchange, Services, Stage
from proxy.stages.cache.replay import assemble, serve_answer
from proxy.stages.cache.store import HEADER, hit_usage
from proxy.stages.semcache.config import SemanticPolicy, parse_semantic
from proxy.stages.semcache.namespace import bypassed, question
from proxy.stores import semantic_cache as store_mod
from proxy.stores.semantic_cache import Found, SemanticStore

log = logging.getLogger("tollway.semantic_cache")

SIMILARITY_HEADER = "x-tollway-cache-similarity"
EXTRA = "semantic_cache"
LOOKUP_TIMEOUT_S = 0.5  # a Postgres slower than this: a miss
SWEEP_TICK_S = 1.0  # how often the sweeper rereads the live interval


@dataclass(slots=True)
class Pending:
    """A miss: where its answer goes once the client has it."""

    scope: str
    namespace: bytes
    vector: list[float]
    ttl_s: float


class SemanticCacheStage(Stage):
    name = "semcache"
    section = "semantic_cache"

    def __init__(self) -> None:
        self.database_url: str | None = None
        self.embedder: Embedder | None = None
        self.tasks = TaskGroup()
        self.store: SemanticStore | None = None
        self.live_settings: Callable[[str], object | None] = lambda section: None
        self.results: Counter[str] = Counter()
        self._opening = asyncio.Lock()
        self._down_until = 0.0  # after a failed connect, do not retry before this
        self._sweeping: asyncio.Task[None] | None = None

    @classmethod
    def configure(cls, raw: Any, config: Config) -> SemanticPolicy | None:
        policy = parse_semantic(raw, config)
        return policy if policy.active else None

    async def open(self, services: Services) -> None:
        self.database_url, self.embedder = services.database_url, services.embedder
        self.tasks = services.tasks
        self.live_settings = services.live_settings

    async def close(self) -> None:
        if self._sweeping is not None:
            self._sweeping.cancel()
            await asyncio.gather(self._sweeping, return_exceptions=True)
        if self.store is not None:
            store, self.store = self.store, None
            await self._flush_hits(store)
            await store.pool.close()

    @staticmethod
    async def _flush_hits(store: SemanticStore) -> None:
        try:
            await store.flush_hits()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("semantic cache: hit counts not written yet (%r)", exc)

    async def _store(self) -> SemanticStore | None:
        """The pool, opened at the first request that needs it (a gateway with
        the cache off never connects); a failed connect is retried after 5 s."""
        if self.store is not None or self.database_url is None:
            return self.store
        if time.monotonic() < self._down_until:
            return None
        async with self._opening:
            if self.store is None:
                try:
                    pool = await store_mod.open_pool(self.database_url)
                except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                    log.warning("semantic cache: cannot connect to Postgres (%s): misses", exc)
                    self._down_until = time.monotonic() + 5
                    return None
                self.store = SemanticStore(pool)
                self._sweeping = self.tasks.spawn(
                    self._sweeper(self.store), name="semantic-cache-sweeper"
                )
        return self.store

    async def on_request(self, ex: Exchange, settings: SemanticPolicy) -> web.StreamResponse | None:
        rule = settings.for_model(ex.model)
        if not rule.enabled or ex.endpoint != "chat":
            return None
        asked = question(ex.body, ex.endpoint, ex.model)
        # not cacheable: an earlier stage (guardrails' restore) needs this request's own answer
        if asked is None or not ex.cacheable or bypassed(ex.body, ex.inbound, settings):
            self._result(ex, "bypass")
            return None
        store = await self._store()
        if store is None or self.embedder is None:
            self._result(ex, "miss")
            return None
        started = time.perf_counter()
        bill_tenant = settings.embedding_billing == "tenant"
        try:
            vector = await self.embedder.embed(
                settings.embedding_model,
                asked.text,
                ex.record,
                bill_tenant,
                settings.embedding_timeout_s,
            )
        except Exception as exc:  # noqa: BLE001 - any failure of the embedding call is a miss
            log.info("semantic cache: no embedding for %s (%r)", ex.record.request_id, exc)
            self._result(ex, "miss", embed_s=time.perf_counter() - started)
            return None
        embed_s = time.perf_counter() - started
        found = await self._lookup(store, ex.scope, asked.namespace, vector)
        if found is None or found.similarity < rule.threshold:
            ex.notes[self.name] = Pending(ex.scope, asked.namespace, vector, rule.ttl_s)
            ex.passthrough = False  # the answer is to be kept, in chat
            similarity = None if found is None else found.similarity
            self._result(ex, "miss", embed_s=embed_s, similarity=similarity)
            return None
        return await self._serve(ex, settings, store, found, embed_s)

    async def _lookup(
        self, store: SemanticStore, scope: str, namespace: bytes, vector: list[float]
    ) -> Found | None:
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                return await store.lookup(scope, namespace, vector)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("semantic cache lookup failed (%r): a miss", exc)
            return None

    async def _serve(
        self,
        ex: Exchange,
        settings: SemanticPolicy,
        store: SemanticStore,
        found: Found,
        embed_s: float,
    ) -> web.StreamResponse:
        store.note_hit(found.id)
        saved = price_usage(ex.config.prices, found.usage, None, None, ex.model)
        self._result(
            ex,
            "hit",
            embed_s=embed_s,
            similarity=found.similarity,
            saved_usd=float(saved) if saved is not None else None,
        )
        ex.record.cache = "semantic-hit"
        headers = {
            **ex.headers,
            HEADER: "semantic-hit",
            SIMILARITY_HEADER: f"{found.similarity:.4f}",
        }
        usage = hit_usage(found.usage, settings.hit_billing)
        include_usage = parse.wants_usage(ex.body)
        return await serve_answer(
            ex.request, found.body, usage, ex.record, headers, include_usage, ex.started, ex.door
        )

    def _result(self, ex: Exchange, result: str, **facts: float | None) -> None:
        """What the request did; a miss or bypass says so in ``x-tollway-cache``
        unless the exact cache already did."""
        self.results[result] += 1
        if result != "hit":
            ex.headers.setdefault(HEADER, result)
        ex.record.extra[EXTRA] = {
            "result": result,
            **{k: round(v, 6) for k, v in facts.items() if v is not None},
        }

    def on_settle(self, ex: Exchange, settings: SemanticPolicy) -> None:
        pending = ex.notes.get(self.name)
        record, store = ex.record, self.store
        if not isinstance(pending, Pending) or store is None or record.provider_model is None:
            return
        if record.status != 200 or record.client_disconnected or record.cached:
            return
        if ex.meter is not None:
            if not ex.meter.done:
                return
            body = assemble(ex.meter.payloads, ex.endpoint, record.usage)
        else:
            body = ex.reply.body if ex.reply is not None else None
        if body is None:
            return
        self.tasks.spawn(self._keep(store, ex.model, pending, body, record), name="semantic-put")

    async def _keep(
        self, store: SemanticStore, model: str, pending: Pending, body: bytes, record: Any
    ) -> None:
        try:
            await store.put(
                pending.scope,
                model,
                pending.namespace,
                pending.vector,
                body,
                record.usage,
                pending.ttl_s,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("semantic cache: answer not stored (%r)", exc)

    def _policy(self) -> SemanticPolicy:
        """The live config's settings; the defaults once the cache is turned
        off (its rows still expire)."""
        live = self.live_settings(self.section or "")
        return live if isinstance(live, SemanticPolicy) else SemanticPolicy()

    async def _sweeper(self, store: SemanticStore) -> None:
        last = time.monotonic()
        while self.store is store:
            policy = self._policy()
            due = last + policy.sweep_interval_s - time.monotonic()
            if due > 0:
                await asyncio.sleep(min(due, SWEEP_TICK_S))
                await self._flush_hits(store)
                continue
            last = time.monotonic()
            try:
                expired, evicted = await store.sweep(policy.max_entries_per_tenant)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("semantic cache sweep failed (%r)", exc)
                continue
            if expired or evicted:
                log.info("semantic cache sweep: %d expired, %d evicted", expired, evicted)
