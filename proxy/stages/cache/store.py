"""The exact response cache, between admit and forward.

A request is looked up by the fingerprint of what decides its answer: the
endpoint, the public model and the body (messages or prompt, sampling
parameters, tools, response format, ``max_tokens`` as admitted, ...), keys
sorted, minus what does not change the answer (``stream``,
``stream_options``, ``user``, ``metadata``, ``store``). Entries are scoped
per tenant (per gateway without API keys) unless the model's ``scope`` is
``shared``.

Only deterministic requests are cached by default: temperature 0 (or unset,
with ``unset_temperature: true``) and ``n`` 1; embeddings always are. The
client decides per request with ``x-tollway-cache: no-store`` (neither read
nor write) or ``force`` (read and write even when the request is not
deterministic or its model is not cached). Responses say
``x-tollway-cache: hit | miss | bypass`` whenever the cache is configured.

Only whole successes are stored: a 200 reply, or a stream that reached
``[DONE]`` with its client still there, at most ``max_entry_bytes``. The
write happens in the background, after the client has its answer. With
Redis down a lookup is a miss at once and nothing is stored.

Redis keys: ``tw:cache:{<scope>}:<sha256>``, a plain string with the TTL of
the model's ``ttl_s``; its value is one line of metadata (the usage and the
expiry time) and the response JSON. Each process also keeps the entries it
read or wrote in a small ``NearCache`` for ``local_ttl_s`` (1 s by default,
never past the entry's expiry): a hot key costs one Redis read per second
per process instead of one per request, which is what makes a hit cheaper
than asking a provider.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.core.errors import InvalidRequest
from proxy.core.metering import StreamMeter
from proxy.core.usage import Usage
from proxy.providers.base import GENERATIVE
from proxy.stages.cache.config import CachePolicy, ModelCache
from proxy.stores.redis_client import RedisDown, SharedRedis

HEADER = "x-tollway-cache"
Assemble = Callable[[list[bytes], str, Usage], bytes | None]
_IGNORED = frozenset(("stream", "stream_options", "user", "metadata", "store", "model"))


@dataclass(frozen=True, slots=True)
class Entry:
    body: bytes  # the OpenAI response JSON, as first served
    usage: Usage  # what the provider reported (or was estimated) for it
    expires_at: float = 0.0  # wall clock, when Redis drops it


def encode(body: bytes, usage: Usage, expires_at: float) -> bytes:
    meta = {
        "p": usage.prompt_tokens,
        "c": usage.completion_tokens,
        "s": usage.source,
        "x": expires_at,
    }
    return orjson.dumps(meta) + b"\n" + body


def decode(raw: bytes) -> Entry | None:
    head, sep, body = raw.partition(b"\n")
    if not sep:
        return None
    try:
        meta = orjson.loads(head)
        usage = Usage(meta["p"], meta["c"], meta["s"])
        expires_at = float(meta["x"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return Entry(body, usage, expires_at)


class NearCache:
    """Entries this process read or wrote recently, bounded in bytes (LRU)."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, tuple[float, Entry]] = OrderedDict()
        self._bytes = 0

    def get(self, key: str) -> Entry | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= time.monotonic():
            self._drop(key)
            return None
        return item[1]

    def put(self, key: str, entry: Entry, ttl_s: float, max_bytes: int) -> None:
        ttl_s = min(ttl_s, entry.expires_at - time.time())
        if ttl_s <= 0 or len(entry.body) > max_bytes:
            return
        self._drop(key)
        self._items[key] = (time.monotonic() + ttl_s, entry)
        self._bytes += len(entry.body)
        while self._bytes > max_bytes:
            self._drop(next(iter(self._items)))

    def _drop(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= len(item[1].body)


def fingerprint(endpoint: str, model: str, body: Mapping[str, Any]) -> str:
    kept = {k: v for k, v in body.items() if k not in _IGNORED and v is not None}
    if kept.get("n") == 1:
        del kept["n"]
    blob = orjson.dumps([endpoint, model, kept], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(blob).hexdigest()


def deterministic(body: Mapping[str, Any], endpoint: str, policy: CachePolicy) -> bool:
    if endpoint not in GENERATIVE:
        return True
    if body.get("n") not in (None, 1):
        return False
    if not policy.deterministic_only:
        return True
    temperature = body.get("temperature")
    return temperature == 0 if temperature is not None else policy.unset_temperature


def client_choice(headers: Mapping[str, str]) -> str | None:
    value = headers.get(HEADER)
    if value is None:
        return None
    choice = value.strip().lower()
    if choice not in ("no-store", "force"):
        raise InvalidRequest(
            f"Invalid {HEADER} header {value[:40]!r}: expected 'no-store' or 'force'.",
            param=HEADER,
        )
    return choice


@dataclass(slots=True)
class Lookup:
    """One request's view of the cache: what the lookup found and where the
    answer is to be stored."""

    status: str  # "hit" | "miss" | "bypass"; "" when no cache is configured
    entry: Entry | None = None
    key: str | None = None  # where to store the answer (None: do not store)
    ttl_s: float = 0.0
    policy: CachePolicy | None = None
    _cache: ResponseCache | None = field(default=None, repr=False)

    def headers(self) -> dict[str, str]:
        return {HEADER: self.status} if self.status else {}

    def keep_reply(self, body: bytes, usage: Usage, status: int) -> None:
        if self.key is not None and self._cache is not None and status == 200:
            self._cache.store(self.key, body, usage, self)

    def keep_stream(
        self,
        meter: StreamMeter,
        body: Mapping[str, Any],
        endpoint: str,
        model: str,
        ok: bool,
        assemble: Assemble,
    ) -> None:
        """``ok``: the stream reached ``[DONE]`` with status 200 and its client.
        ``assemble`` turns its events into the reply JSON (``replay.assemble``)."""
        cache, key = self._cache, self.key
        redis = cache.redis if cache is not None else None
        whole = ok and meter.done
        if key is None or cache is None or redis is None or not redis.up or not whole:
            return

        async def store() -> None:  # after the client has its last byte
            usage = meter.result(dict(body), endpoint, model)
            answer = assemble(meter.payloads, endpoint, usage)
            if answer is not None:
                await cache.put(key, answer, usage, self)

        redis.spawn(store(), name="cache-store")


NO_CACHE = Lookup("")


class ResponseCache:
    def __init__(self, redis: SharedRedis | None) -> None:
        self.redis = redis
        self.near = NearCache()
        self.lookups: Counter[str] = Counter()  # by result: hit, miss, bypass
        self.oversized = 0  # answers too big to store

    async def lookup(
        self,
        policy: CachePolicy | None,
        headers: Mapping[str, str],
        body: Mapping[str, Any],
        endpoint: str,
        model: str,
        tenant: str,
    ) -> Lookup:
        """``tenant`` scopes the entry (``t<id>``, or ``gw`` without API keys)."""
        if policy is None or not policy.active:
            return NO_CACHE
        rule = _rule(policy, model, body, endpoint, client_choice(headers))
        if rule is None:
            self.lookups["bypass"] += 1
            return Lookup("bypass")
        scope = "shared" if rule.scope == "shared" else tenant
        key = f"tw:cache:{{{scope}}}:{fingerprint(endpoint, model, body)}"
        found = Lookup("miss", None, key, rule.ttl_s, policy, self)
        entry = self.near.get(key) if policy.local_ttl_s else None
        if entry is None and self.redis is not None:
            try:
                raw = await self.redis.call(lambda r: r.get(key))
            except RedisDown:
                raw = None
            entry = decode(raw) if isinstance(raw, bytes) else None
            if entry is not None:
                self.near.put(key, entry, policy.local_ttl_s, policy.local_max_bytes)
        if entry is not None:
            found.status, found.entry, found.key = "hit", entry, None
        self.lookups[found.status] += 1
        return found

    def store(self, key: str, body: bytes, usage: Usage, where: Lookup) -> None:
        if self.redis is not None and self.redis.up:
            self.redis.spawn(self.put(key, body, usage, where), name="cache-store")

    async def put(self, key: str, body: bytes, usage: Usage, where: Lookup) -> None:
        policy = where.policy
        assert self.redis is not None and policy is not None
        entry = Entry(body, usage, time.time() + where.ttl_s)
        value = encode(body, usage, entry.expires_at)
        if len(value) > policy.max_entry_bytes:
            self.oversized += 1
            return
        ttl_ms = max(1, int(where.ttl_s * 1000))
        await self.redis.call(lambda r: r.set(key, value, px=ttl_ms))
        if policy.local_ttl_s:
            self.near.put(key, entry, policy.local_ttl_s, policy.local_max_bytes)


def _rule(
    policy: CachePolicy, model: str, body: Mapping[str, Any], endpoint: str, choice: str | None
) -> ModelCache | None:
    if choice == "no-store":
        return None
    rule = policy.for_model(model)
    if choice == "force":
        return rule
    if not rule.enabled or not deterministic(body, endpoint, policy):
        return None
    return rule


def usage_of(entry: Entry, policy: CachePolicy | None) -> Usage:
    """What a hit bills: no tokens (``hit_billing: request``), or the original's."""
    return hit_usage(entry.usage, policy.hit_billing if policy is not None else "request")


def hit_usage(original: Usage, hit_billing: str) -> Usage:
    """``tokens``: the original answer's usage; ``request``: none (one request).
    Shared with the semantic cache."""
    return original if hit_billing == "tokens" else Usage()
