"""Forward-only schema migrations from ``sql/NNNN_name.sql``.

``tollway migrate`` applies the missing ones in order, each in its own
transaction, under an advisory lock so concurrent starts cannot race.
``serve`` calls ``check`` and refuses to start on an unmigrated database.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import asyncpg

from proxy.stores import pgdsn

_LOCK_ID = 0x70_11_3A_7  # advisory lock key: "tollway migrate"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class NotMigrated(RuntimeError):
    pass


def sql_dir() -> Path:
    if os.environ.get("TOLLWAY_SQL_DIR"):
        return Path(os.environ["TOLLWAY_SQL_DIR"])
    here = Path(__file__).resolve().parent
    for candidate in (here.parents[1] / "sql", here / "sql"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("the sql/ migrations directory was not found")


def available() -> list[tuple[int, Path]]:
    out = []
    for path in sorted(sql_dir().iterdir()):
        m = _NAME.match(path.name)
        if m:
            out.append((int(m.group(1)), path))
    return out


async def _applied(conn: asyncpg.Connection) -> set[int]:
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version integer PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    return {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}


async def migrate(dsn: str) -> list[str]:
    """Apply pending migrations; return the names applied."""
    conn = await asyncpg.connect(**pgdsn.options(dsn))
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
        try:
            done = await _applied(conn)
            applied = []
            for version, path in available():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        version,
                        path.name,
                    )
                applied.append(path.name)
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    finally:
        await conn.close()


async def check(conn: asyncpg.Connection | asyncpg.Pool) -> None:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done = set()
    if exists:
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    missing = [p.name for v, p in available() if v not in done]
    if missing:
        raise NotMigrated(
            f"the database is not migrated (missing {', '.join(missing)}): run `tollway migrate`"
        )
