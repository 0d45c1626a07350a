"""The semantic cache's rows in Postgres (pgvector), table ``semantic_cache``
(``sql/0004_semantic_cache.sql``).

A lookup is one indexed query: the nearest stored vector by cosine distance
among the rows of one scope and namespace that have not expired. Vectors
travel in pgvector's binary format (its asyncpg codec is registered on every
connection of this store's own small pool), never as text.

The HNSW index is partial, per dimension count, because the column has no
fixed dimension (one table for every embedding model): ``ensure_index``
creates it the first time a vector of that size is stored. pgvector's
iterative index scan (``hnsw.iterative_scan``) is on for every connection,
so a namespace holding few of a tenant's many rows is still found by the
index instead of being filtered out of its first candidates.

Expiry and the per-scope entry cap are enforced by ``sweep``, which the
stage runs in the background: between sweeps a lookup ignores expired rows
(``expires_at > now()``), and a scope may briefly hold more than its cap.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import asyncpg
from pgvector.asyncpg import register_vector

from proxy.core.usage import Usage
from proxy.stores import pgdsn
from proxy.stores.accounts import AccountError

POOL_SIZE = 4


@dataclass(frozen=True, slots=True)
class Found:
    id: int
    body: bytes
    usage: Usage
    similarity: float


async def _init(conn: asyncpg.Connection) -> None:
    await register_vector(conn)


async def open_pool(dsn: str, connect_timeout: float = 2.0) -> asyncpg.Pool:
    """Its own pool: the vector codec on each connection, short statements."""
    pool = await asyncpg.create_pool(
        **pgdsn.options(dsn),
        min_size=1,
        max_size=POOL_SIZE,
        timeout=connect_timeout,
        command_timeout=5,
        init=_init,
        server_settings={
            "hnsw.iterative_scan": "relaxed_order",
            "hnsw.ef_search": "40",
            # Planned per lookup (about 0.1 ms): the namespace's own row estimate picks
            # the HNSW index for a crowded namespace, its btree for a small one.
            "plan_cache_mode": "force_custom_plan",
            # A cache row lost in a crash is a miss, not lost money: its writes
            # need not wait for the WAL flush (an fsync per put or hit count).
            "synchronous_commit": "off",
        },
    )
    assert pool is not None
    return pool


def _dims(vector: list[float]) -> int:
    n = len(vector)
    if not 0 < n <= 16000:
        raise ValueError(f"an embedding of {n} dimensions cannot be cached")
    return n


def index_sql(dims: int) -> str:
    """The partial HNSW index of ``dims``-dimension rows (cosine distance)."""
    return (
        f"CREATE INDEX IF NOT EXISTS semantic_cache_hnsw_{dims} ON semantic_cache USING hnsw "
        f"((embedding::vector({dims})) vector_cosine_ops) WHERE dims = {dims}"
    )


def lookup_query(
    scope: str, namespace: bytes, vector: list[float]
) -> tuple[str, str, bytes, list[float]]:
    """The lookup's SQL and arguments (``bench/semcache.py`` explains it)."""
    dims = _dims(vector)
    sql = f"""
        SELECT id, body, prompt_tokens, completion_tokens, usage_source,
               embedding::vector({dims}) <=> $3 AS distance
        FROM semantic_cache
        WHERE scope = $1 AND namespace = $2 AND dims = {dims} AND expires_at > now()
        ORDER BY embedding::vector({dims}) <=> $3
        LIMIT 1
        """
    return sql, scope, namespace, vector


_PURGE = "DELETE FROM semantic_cache WHERE scope = $1 AND ($2::text IS NULL OR model = $2)"
_EXPIRE = """
DELETE FROM semantic_cache WHERE id IN (
    SELECT id FROM semantic_cache WHERE expires_at <= now() LIMIT $1
)
"""
# Each scope over its cap loses its least recently used rows (a hit renews a row).
_EVICT = """
DELETE FROM semantic_cache c USING (
    SELECT x.id
    FROM (SELECT scope, count(*) - $1 AS extra FROM semantic_cache
          GROUP BY scope HAVING count(*) > $1) o
    CROSS JOIN LATERAL (
        SELECT id FROM semantic_cache s WHERE s.scope = o.scope
        ORDER BY greatest(s.created_at, s.last_hit_at), s.id LIMIT o.extra
    ) x
) d WHERE c.id = d.id
"""


_COUNT_HITS = """
UPDATE semantic_cache c SET hits = c.hits + u.n, last_hit_at = now()
FROM unnest($1::bigint[], $2::int[]) AS u(id, n) WHERE c.id = u.id
"""


class SemanticStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        # Hits noted since the last flush, by row: one UPDATE per row per hit
        # queued on the hot row's lock and held the pool's connections from
        # the lookups (hits stopped scaling at ~120/s).
        self._hits: Counter[int] = Counter()
        self._indexed: set[int] = set()  # dimension counts known to have their index

    async def ensure_index(self, dims: int) -> None:
        """The partial HNSW index for ``dims``-dimension vectors, once."""
        if dims in self._indexed:
            return
        name = f"semantic_cache_hnsw_{dims}"
        exists = await self.pool.fetchval("SELECT to_regclass($1) IS NOT NULL", name)
        if not exists:
            # normally instant (no rows of that size yet), never cut short
            await self.pool.execute(index_sql(dims), timeout=600)
        self._indexed.add(dims)

    async def lookup(self, scope: str, namespace: bytes, vector: list[float]) -> Found | None:
        """The nearest live row of the namespace, whatever its similarity."""
        row = await self.pool.fetchrow(*lookup_query(scope, namespace, vector))
        if row is None:
            return None
        usage = Usage(row["prompt_tokens"], row["completion_tokens"], row["usage_source"])
        return Found(row["id"], bytes(row["body"]), usage, 1.0 - float(row["distance"]))

    async def put(
        self,
        scope: str,
        model: str,
        namespace: bytes,
        vector: list[float],
        body: bytes,
        usage: Usage,
        ttl_s: float,
    ) -> None:
        dims = _dims(vector)
        await self.ensure_index(dims)
        await self.pool.execute(
            """
            INSERT INTO semantic_cache (scope, model, namespace, dims, embedding, body,
                prompt_tokens, completion_tokens, usage_source, expires_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now() + make_interval(secs => $10))
            """,
            scope,
            model,
            namespace,
            dims,
            vector,
            body,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.source,
            ttl_s,
        )

    def note_hit(self, entry_id: int) -> None:
        """Counted in memory; ``flush_hits`` writes the counts (the sweeper's tick)."""
        self._hits[entry_id] += 1

    async def flush_hits(self) -> int:
        """Write the hits noted so far in one statement; on failure they are
        kept for the next flush. Returns how many rows were counted."""
        if not self._hits:
            return 0
        hits, self._hits = self._hits, Counter()
        try:
            await self.pool.execute(_COUNT_HITS, list(hits), list(hits.values()))
        except BaseException:
            hits.update(self._hits)
            self._hits = hits
            raise
        return len(hits)

    async def sweep(self, max_per_scope: int, batch: int = 10_000) -> tuple[int, int]:
        """Delete expired rows (at most ``batch``), then each scope's rows
        past its cap; return how many of each."""
        expired = _count(await self.pool.execute(_EXPIRE, batch))
        evicted = _count(await self.pool.execute(_EVICT, max_per_scope))
        return expired, evicted

    async def purge(self, scope: str, model: str | None = None) -> int:
        return _count(await self.pool.execute(_PURGE, scope, model))


async def purge_tenant(
    accounts_db: asyncpg.Pool | asyncpg.Connection,
    cache_db: asyncpg.Pool | asyncpg.Connection,
    tenant: str,
    model: str | None = None,
) -> dict[str, object]:
    """``tollway cache purge`` and ``POST /admin/cache/purge``: delete a
    tenant's entries (of one public model, if given). ``cache_db`` is the
    billing database unless ``SEMANTIC_CACHE_DATABASE_URL`` names another."""
    tenant_id = await accounts_db.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    if tenant_id is None:
        raise AccountError(f"no tenant named {tenant!r}", 404)
    deleted = _count(await cache_db.execute(_PURGE, f"t{tenant_id}", model))
    return {"tenant": tenant, "model": model, "deleted": deleted}


def _count(status: str) -> int:
    """``DELETE 12`` -> 12."""
    return int(status.rsplit(" ", 1)[-1])
