"""Semantic-cache lookup time: ``SemanticStore.lookup`` (the Postgres query
only, no embedding call) with N entries for one tenant, on an embedded
Postgres with pgvector.

Two layouts of the tenant's N rows:

- ``crowded``: every row in one namespace (first-turn questions to one
  model with one system prompt): the namespace filter removes nothing and
  the HNSW index does all the work.
- ``spread``: the rows spread over namespaces of ``--per-namespace`` rows
  each (one conversation prefix has few entries: the common case); the
  lookup must find a handful of rows among the tenant's N.

Rows are bulk-loaded with COPY (binary, pgvector's codec) and the HNSW
index is built afterwards, as ``SemanticStore.ensure_index`` builds it.
Vectors have 256 dimensions (the demo's echo embeddings); half the queries
are near copies of stored vectors of the queried namespace (hits), half
random (misses). One ``EXPLAIN (ANALYZE, BUFFERS)`` of each kind is printed
with ``--explain``.

    .venv/bin/python bench/semcache.py --entries 10000 100000 --queries 2000
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import re
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from proxy.stores import migrate
from proxy.stores.embedded import EmbeddedPostgres
from proxy.stores.semantic_cache import SemanticStore, index_sql, lookup_query, open_pool

DIMS = 256
SCOPE = "t1"
BODY = b'{"id":"x","object":"chat.completion","choices":[]}'
COLUMNS = ("scope", "model", "namespace", "dims", "embedding", "body", "expires_at")
KEEP_EVERY = 97  # rows whose vector the queries may copy (not all: memory)


def vector(rng: random.Random) -> list[float]:
    """A random direction (uniform in the cube: cosine ignores the length)."""
    r = rng.random
    return [r() - 0.5 for _ in range(DIMS)]


def near(v: list[float], rng: random.Random) -> list[float]:
    """``v`` with a little noise: cosine similarity about 0.99."""
    return [x + rng.gauss(0, 0.03) for x in v]


def namespace(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "big")).digest()


def rows(
    n: int, per_namespace: int, kept: list[tuple[bytes, list[float]]]
) -> Iterator[tuple[object, ...]]:
    """``n`` rows, ``per_namespace`` to a namespace; every ``KEEP_EVERY``th
    row's namespace and vector go to ``kept`` for the queries."""
    rng = random.Random(n * 31 + per_namespace)
    expires = datetime.now(UTC) + timedelta(days=1)
    for i in range(n):
        ns, v = namespace(i // per_namespace), vector(rng)
        if i % KEEP_EVERY == 0:
            kept.append((ns, v))
        yield (SCOPE, "echo", ns, DIMS, v, BODY, expires)


async def load(
    pool: asyncpg.Pool, n: int, per_namespace: int
) -> tuple[list[tuple[bytes, list[float]]], float, float]:
    """An empty table, ``n`` rows by COPY, then the HNSW index; the kept
    rows and the seconds each step took."""
    kept: list[tuple[bytes, list[float]]] = []
    async with pool.acquire() as conn:
        # may wait for autovacuum of the previous layout's rows: no 5 s limit
        await conn.execute(f"DROP INDEX IF EXISTS semantic_cache_hnsw_{DIMS}", timeout=600)
        await conn.execute("TRUNCATE semantic_cache", timeout=600)
        t = time.perf_counter()
        await conn.copy_records_to_table(
            "semantic_cache", records=rows(n, per_namespace, kept), columns=COLUMNS, timeout=3600
        )
        copied = time.perf_counter() - t
        await conn.execute("SET maintenance_work_mem = '512MB'")
        t = time.perf_counter()
        await conn.execute(index_sql(DIMS), timeout=3600)  # the gateway's own CREATE INDEX
        indexed = time.perf_counter() - t
        await conn.execute("ANALYZE semantic_cache")
    return kept, copied, indexed


def query(
    kept: list[tuple[bytes, list[float]]], i: int, rng: random.Random
) -> tuple[bytes, list[float]]:
    ns, v = rng.choice(kept)
    return (ns, near(v, rng)) if i % 2 == 0 else (ns, vector(rng))


async def measure(
    store: SemanticStore, kept: list[tuple[bytes, list[float]]], queries: int, threshold: float
) -> tuple[float, float, float]:
    """p50 and p99 lookup ms, and the share of near copies found."""
    rng = random.Random(7)
    times, hits = [], 0
    for i in range(queries):
        ns, q = query(kept, i, rng)
        t = time.perf_counter()
        found = await store.lookup(SCOPE, ns, q)
        times.append((time.perf_counter() - t) * 1000)
        hits += i % 2 == 0 and found is not None and found.similarity >= threshold
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1], hits / (queries / 2)


async def explain(store: SemanticStore, kept: list[tuple[bytes, list[float]]]) -> None:
    """The plan of one hit and one miss, as the store's pool runs them."""
    rng = random.Random(11)
    for i, kind in enumerate(("near copy", "random")):
        ns, q = query(kept, i, rng)
        sql, *args = lookup_query(SCOPE, ns, q)
        plan = await store.pool.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *args)
        print(f"  plan ({kind}):")
        for row in plan:
            print("    " + re.sub(r"'\[[^']*\]'::vector", "$3", row[0]))


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--layouts", default="crowded,spread")
    ap.add_argument("--per-namespace", type=int, default=5, help="rows per namespace (spread)")
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--explain", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedPostgres(Path(tmp) / "pg", cleanup="delete")
        url = server.start()
        try:
            await migrate.migrate(url)
            store = SemanticStore(await open_pool(url))
            for n in sorted(args.entries):
                for layout in args.layouts.split(","):
                    per_ns = n if layout == "crowded" else args.per_namespace
                    kept, copied, indexed = await load(store.pool, n, per_ns)
                    await measure(store, kept, 200, args.threshold)  # warm up
                    p50, p99, found = await measure(store, kept, args.queries, args.threshold)
                    print(
                        f"entries={n} layout={layout} rows_per_namespace={per_ns} "
                        f"lookup_p50_ms={p50:.2f} lookup_p99_ms={p99:.2f} "
                        f"near_copies_found={found:.3f} copy_s={copied:.1f} "
                        f"index_s={indexed:.1f}",
                        flush=True,
                    )
                    if args.explain:
                        await explain(store, kept)
            await store.pool.close()
        finally:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
