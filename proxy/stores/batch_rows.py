"""How a batch reads: its ids, its lines' ids, and a ``batches`` row as
OpenAI's ``Batch`` object (``SELECT_BATCH`` adds the line counts it needs)."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from proxy.stores.pgwait import DatabaseDown

OPEN = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "failed", "expired", "cancelled")


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


def line_request_id(batch_id: str, line: int) -> str:
    """The line's ``id`` and request id: the same however often it runs."""
    return "batch_req_" + hashlib.sha256(f"{batch_id}:{line}".encode()).hexdigest()[:24]


def line_event_id(batch_id: str, custom_id: str) -> str:
    """The line's usage row key: one row per batch and ``custom_id``, ever."""
    return "b" + hashlib.sha256(f"{batch_id}\0{custom_id}".encode()).hexdigest()[:23]


_TIMES = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)

SELECT_BATCH = """
SELECT b.*,
  (SELECT count(*) FROM batch_lines l WHERE l.batch_id = b.id AND l.state = 'completed') AS done,
  (SELECT count(*) FROM batch_lines l WHERE l.batch_id = b.id
     AND l.state IN ('failed', 'expired')) AS failed
FROM batches b
"""


def as_openai(row: asyncpg.Record) -> dict[str, Any]:
    """OpenAI's ``Batch`` object."""
    out: dict[str, Any] = {
        "id": row["id"],
        "object": "batch",
        "endpoint": row["endpoint"],
        "errors": None,
        "input_file_id": row["input_file_id"],
        "completion_window": row["completion_window"],
        "status": row["status"],
        "output_file_id": row["output_file_id"],
        "error_file_id": row["error_file_id"],
        "request_counts": {
            "total": row["total"],
            "completed": row["done"],
            "failed": row["failed"],
        },
        "metadata": orjson.loads(row["metadata"]) if row["metadata"] else None,
    }
    if row["errors"]:
        out["errors"] = {"object": "list", "data": orjson.loads(row["errors"])}
    for name in _TIMES:
        at: datetime | None = row[name]
        out[name] = int(at.timestamp()) if at is not None else None
    # OpenAI's schema has no nulls for these: a field not reached yet is left out.
    return {k: v for k, v in out.items() if v is not None}


def down(exc: BaseException) -> DatabaseDown:
    return DatabaseDown(f"{type(exc).__name__}: {exc}")
