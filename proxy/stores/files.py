"""Uploaded files (the Files API), content and metadata in Postgres.

Every row belongs to one tenant and every query names it, so a key never
sees, reads or deletes another tenant's file (it gets a 404, as if the file
did not exist). Content lives in the same database as the batches that read
it: one store to back up, shared by every instance, written in the same
transaction as its metadata. ``expires_at`` is the retention: ``sweep``
deletes what has passed it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from proxy.stores.pgwait import UNAVAILABLE, DatabaseDown


@dataclass(frozen=True, slots=True)
class StoredFile:
    id: str
    purpose: str
    filename: str
    bytes: int
    created_at: datetime
    expires_at: datetime | None

    def as_openai(self) -> dict[str, Any]:
        """OpenAI's ``OpenAIFile`` object."""
        out: dict[str, Any] = {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": int(self.created_at.timestamp()),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }
        if self.expires_at is not None:
            out["expires_at"] = int(self.expires_at.timestamp())
        return out


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


_COLUMNS = "id, purpose, filename, bytes, created_at, expires_at"


def _file(row: asyncpg.Record) -> StoredFile:
    return StoredFile(
        row["id"],
        row["purpose"],
        row["filename"],
        row["bytes"],
        row["created_at"],
        row["expires_at"],
    )


async def insert(
    conn: asyncpg.Connection | asyncpg.Pool,
    tenant_id: int,
    purpose: str,
    filename: str,
    content: bytes,
    retention: timedelta,
) -> StoredFile:
    row = await conn.fetchrow(
        f"INSERT INTO files (id, tenant_id, purpose, filename, bytes, content, expires_at)"
        f" VALUES ($1, $2, $3, $4, $5, $6, now() + $7) RETURNING {_COLUMNS}",
        new_file_id(),
        tenant_id,
        purpose,
        filename,
        len(content),
        content,
        retention,
    )
    return _file(row)


class FileStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def create(
        self, tenant_id: int, purpose: str, filename: str, content: bytes, retention: timedelta
    ) -> StoredFile:
        try:
            return await insert(self.pool, tenant_id, purpose, filename, content, retention)
        except UNAVAILABLE as exc:
            raise DatabaseDown(str(exc)) from exc

    async def get(self, tenant_id: int, file_id: str) -> StoredFile | None:
        try:
            row = await self.pool.fetchrow(
                f"SELECT {_COLUMNS} FROM files WHERE id = $1 AND tenant_id = $2",
                file_id,
                tenant_id,
            )
        except UNAVAILABLE as exc:
            raise DatabaseDown(str(exc)) from exc
        return _file(row) if row is not None else None

    async def content(self, tenant_id: int, file_id: str) -> bytes | None:
        try:
            value = await self.pool.fetchval(
                "SELECT content FROM files WHERE id = $1 AND tenant_id = $2", file_id, tenant_id
            )
        except UNAVAILABLE as exc:
            raise DatabaseDown(str(exc)) from exc
        return bytes(value) if value is not None else None

    async def page(
        self, tenant_id: int, purpose: str | None, after: str | None, limit: int
    ) -> tuple[list[StoredFile], bool]:
        """Newest first, ``limit`` of them after the file ``after``; and whether more follow."""
        try:
            rows = await self.pool.fetch(
                f"SELECT {_COLUMNS} FROM files WHERE tenant_id = $1"
                " AND ($2::text IS NULL OR purpose = $2)"
                " AND ($3::text IS NULL OR (created_at, id) <"
                "      (SELECT created_at, id FROM files WHERE id = $3 AND tenant_id = $1))"
                " ORDER BY created_at DESC, id DESC LIMIT $4",
                tenant_id,
                purpose,
                after,
                limit + 1,
            )
        except UNAVAILABLE as exc:
            raise DatabaseDown(str(exc)) from exc
        return [_file(r) for r in rows[:limit]], len(rows) > limit

    async def delete(self, tenant_id: int, file_id: str) -> bool:
        try:
            status = await self.pool.execute(
                "DELETE FROM files WHERE id = $1 AND tenant_id = $2", file_id, tenant_id
            )
        except UNAVAILABLE as exc:
            raise DatabaseDown(str(exc)) from exc
        return bool(status.endswith(" 1"))

    async def sweep(self) -> int:
        """Delete the files past their retention; how many."""
        status = await self.pool.execute(
            "DELETE FROM files WHERE expires_at IS NOT NULL AND expires_at < now()"
        )
        return int(status.split()[-1])
