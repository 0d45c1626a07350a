"""The authenticate stage: ``Authorization: Bearer <key>`` → a ``Principal``.

The key's shape is checked before anything else, so malformed keys cost no
query. Lookups are cached per process by digest for ``key_cache_ttl_s``
(5 s by default), unknown digests too, so the hot path does not touch
Postgres; a revocation or tier change therefore reaches every worker within
that TTL. Unknown, revoked, expired and malformed keys all get the same 401,
which never echoes the key.

A key the cache holds as valid is also found by the exact ``Authorization``
value it came in (``Authenticator.cached``), so a repeat request skips the
HMAC. That entry is only a pointer to the digest's cache entry: it answers
while the digest cache still holds *that same* entry unexpired, so expiry,
revocation and eviction reach it exactly as they reach the digest cache
(see ``_Seen``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg
import orjson

from proxy.config.budgets import Overrides, overrides_of, parse_overrides
from proxy.core.errors import InvalidApiKey, ServiceUnavailable
from proxy.core.principal import Principal
from proxy.stores import apikeys, pgwait


def invalid_key() -> InvalidApiKey:
    return InvalidApiKey(
        "Incorrect API key provided. Ask the administrator of this gateway for a valid key "
        "(they make one with `tollway keys create`)."
    )


def bearer(header: str | None) -> str:
    if not header or not header.startswith("Bearer "):
        raise InvalidApiKey(
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    return header[7:].strip()


class KeyCache:
    """Digest → Principal (or None for unknown/revoked), with a TTL and a size bound.

    ``entries`` (digest → (expiry by ``clock``, principal)) and ``clock`` are
    read, never written, by the ``Authorization`` value map (``_Seen``): its
    per-request check is an identity test on the entry and its expiry,
    which a method call would only make dearer."""

    def __init__(
        self, ttl: float, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self._max = max_entries
        self.clock = clock
        self.entries: OrderedDict[bytes, tuple[float, Principal | None]] = OrderedDict()

    def get(self, digest: bytes, *, stale_ok: bool = False) -> tuple[bool, Principal | None]:
        hit = self.entries.get(digest)
        if hit is None or (hit[0] < self.clock() and not stale_ok):
            return False, None
        return True, hit[1]

    def put(self, digest: bytes, principal: Principal | None) -> None:
        self.entries[digest] = (self.clock() + self.ttl, principal)
        self.entries.move_to_end(digest)
        while len(self.entries) > self._max:
            self.entries.popitem(last=False)

    def entry(self, digest: bytes) -> tuple[float, Principal | None] | None:
        """The digest's entry as stored (expired or not): what ``_Seen`` points at."""
        return self.entries.get(digest)


# How many ``Authorization`` values ``Authenticator`` remembers; the map is
# emptied when full (a repeat key is found again by one HMAC).
SEEN_MAX = 10_000


class _Seen:
    """``Authorization`` value → (digest, the digest's cache entry), for the
    keys the cache holds as valid: a repeat request skips the HMAC.

    Keyed by the exact header string, not by a hash of it: a dict compares
    the strings themselves on a hash match, so no other credential can ever
    find an entry (a 64-bit ``hash()`` as key would let a collision
    authenticate as someone else's key). It holds only what the process
    already sees in every request header; unknown and revoked keys are
    never remembered (junk cannot fill it), and the map is bounded.

    An entry answers only while ``KeyCache`` still holds the very entry it
    points at (an identity check, and its expiry): a refresh after the TTL,
    a revocation, an eviction all make a new entry or none, so the remembered
    value misses and the request takes the digest path, as before."""

    __slots__ = ("_map",)

    def __init__(self) -> None:
        self._map: dict[str, tuple[bytes, tuple[float, Principal | None]]] = {}

    def get(self, header: str, cache: KeyCache) -> Principal | None:
        seen = self._map.get(header)
        if seen is None:
            return None
        digest, entry = seen
        # still the digest's very entry, and unexpired (``KeyCache.get``'s test)
        if cache.entries.get(digest) is not entry or entry[0] < cache.clock():
            del self._map[header]
            return None
        return entry[1]

    def remember(self, header: str, digest: bytes, cache: KeyCache) -> None:
        entry = cache.entry(digest)
        if entry is None or entry[1] is None:
            return  # only keys held as valid
        if len(self._map) >= SEEN_MAX:
            self._map.clear()
        self._map[header] = (digest, entry)


class Authenticator:
    def __init__(
        self,
        pool: asyncpg.Pool,
        hasher: apikeys.KeyHasher,
        cache: KeyCache,
        db_timeout: float = 2.0,
    ) -> None:
        self.pool = pool
        self.db_wait = pgwait.Budget(db_timeout)  # the whole lookup, connection included
        self.hasher = hasher
        self.cache = cache
        self.queries = 0  # lookups that reached Postgres; tests assert on it
        self.seen = _Seen()

    def cached(self, header: str | None) -> Principal | None:
        """``authenticate`` from the cache alone, without a coroutine: the
        principal, or the same 401; None when the key must be looked up."""
        if header is not None:
            known = self.seen.get(header, self.cache)
            if known is not None:
                # its expiry, checked as on the digest path (``_valid``)
                return known if known.expires_at is None else _valid(known)
        key = bearer(header)
        if len(key) != apikeys.KEY_LENGTH:
            raise invalid_key()  # junk of any size: refused before it is hashed
        # Only keys of the right shape are ever cached (``authenticate`` looks
        # up no other), so a hit needs no shape check; a miss gets it there.
        digest = self.hasher.digest(key)
        found, principal = self.cache.get(digest)
        if not found:
            return None
        valid = _valid(principal)
        assert header is not None  # bearer() refused None
        self.seen.remember(header, digest, self.cache)
        return valid

    async def authenticate(self, header: str | None) -> Principal:
        key = bearer(header)
        if not apikeys.looks_valid(key):
            raise invalid_key()
        digest = self.hasher.digest(key)
        found, principal = self.cache.get(digest)
        if not found:
            try:
                principal = await self._lookup(digest)
            except ServiceUnavailable:
                # Postgres is down: a key we knew keeps working (stale-if-error).
                found, principal = self.cache.get(digest, stale_ok=True)
                if not found:
                    raise
            else:
                self.cache.put(digest, principal)
        valid = _valid(principal)
        assert header is not None  # bearer() refused None
        self.seen.remember(header, digest, self.cache)
        return valid

    async def _lookup(self, digest: bytes) -> Principal | None:
        self.queries += 1
        try:
            row = await apikeys.lookup(self.pool, self.db_wait, digest)
        except pgwait.DatabaseDown:
            raise ServiceUnavailable(
                "The key store is unreachable; please retry shortly.",
                code="billing_unavailable",
                headers={"retry-after": "2"},
            ) from None
        if row is None or row["state"] != "active":
            return None
        return Principal(
            key_id=row["id"],
            key_prefix=row["prefix"],
            tenant_id=row["tenant_id"],
            tenant=row["tenant"],
            tier=row["tier"],
            expires_at=row["expires_at"],
            budgets=budget_overrides(row["tenant_budgets"], row["key_budgets"]),
        )


def _valid(principal: Principal | None) -> Principal:
    """The principal of a known, active, unexpired key; else the 401."""
    if principal is None:
        raise invalid_key()
    if principal.expires_at is not None and principal.expires_at <= datetime.now(UTC):
        raise invalid_key()
    return principal


def budget_overrides(tenant: str | None, key: str | None) -> Overrides:
    """The ``budgets`` jsonb columns (written validated by the admin code)."""
    if tenant is None and key is None:
        return ()
    return overrides_of(
        parse_overrides(orjson.loads(tenant) if tenant else None, "tenant.budgets"),
        parse_overrides(orjson.loads(key) if key else None, "key.budgets"),
    )
