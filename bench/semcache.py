"""Semantic-cache lookup time (the Postgres query only, no embedding call)
with N entries for one tenant, on an embedded Postgres with pgvector.

Worst case for the index: every entry is in the same namespace (first-turn
questions to one model), so the namespace filter removes nothing and the
HNSW index does all the work. Vectors are random unit vectors of 256
dimensions (the demo's echo embeddings); half the queries are near copies of
stored vectors (hits), half random (misses).

    .venv/bin/python bench/semcache.py --entries 10000 100000 --queries 2000
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

from proxy.stores import migrate
from proxy.stores.embedded import EmbeddedPostgres
from proxy.stores.semantic_cache import SemanticStore, open_pool

DIMS = 256


def unit(rng: random.Random) -> list[float]:
    v = [rng.gauss(0, 1) for _ in range(DIMS)]
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def near(v: list[float], rng: random.Random) -> list[float]:
    w = [x + rng.gauss(0, 0.01) for x in v]
    n = math.sqrt(sum(x * x for x in w))
    return [x / n for x in w]


async def fill(
    store: SemanticStore, scope: str, ns: bytes, have: int, want: int
) -> list[list[float]]:
    rng = random.Random(have)
    await store.ensure_index(DIMS)  # as the gateway does: before the first row of that size
    vectors = [unit(rng) for _ in range(want - have)]
    body = b'{"id":"x","object":"chat.completion","choices":[]}'
    async with store.pool.acquire() as conn:
        rows = [(scope, "echo", ns, DIMS, v, body) for v in vectors]
        await conn.executemany(
            "INSERT INTO semantic_cache"
            " (scope, model, namespace, dims, embedding, body, expires_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, now() + interval '1 day')",
            rows,
            timeout=3600,
        )
    return vectors


async def measure(
    store: SemanticStore, scope: str, ns: bytes, stored: list[list[float]], queries: int
) -> tuple[float, float, float]:
    rng = random.Random(7)
    times, hits = [], 0
    for i in range(queries):
        q = near(rng.choice(stored), rng) if i % 2 == 0 else unit(rng)
        t = time.perf_counter()
        found = await store.lookup(scope, ns, q)
        times.append((time.perf_counter() - t) * 1000)
        hits += found is not None and found.similarity >= 0.95
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1], hits / (queries / 2)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedPostgres(Path(tmp) / "pg", cleanup="delete")
        url = server.start()
        try:
            await migrate.migrate(url)
            store = SemanticStore(await open_pool(url))
            scope, ns = "t1", b"\x01" * 32
            stored: list[list[float]] = []
            for n in sorted(args.entries):
                t = time.perf_counter()
                stored += await fill(store, scope, ns, len(stored), n)
                filled = time.perf_counter() - t
                await store.pool.execute("ANALYZE semantic_cache")
                await measure(store, scope, ns, stored, 200)  # warm the cache
                p50, p99, recall = await measure(store, scope, ns, stored, args.queries)
                print(
                    f"entries={n} lookup_p50_ms={p50:.2f} lookup_p99_ms={p99:.2f} "
                    f"near_copy_hit_rate={recall:.3f} fill_s={filled:.0f}",
                    flush=True,
                )
            await store.pool.close()
        finally:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
