"""Helpers for the Files and Batch API tests: JSONL inputs, a keyed gateway, waits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import openai
import orjson
from openai.types import Batch

from tests.waiting import until

MSG = [{"role": "user", "content": "Say hello"}]


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(x) + b"\n" for x in lines)


def chat_line(custom_id: str, model: str, url: str = "/v1/chat/completions") -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": f"hello {custom_id}"}]}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


async def upload(client: openai.AsyncOpenAI, lines: list[dict[str, Any]], tmp: Path) -> str:
    path = tmp / "input.jsonl"
    path.write_bytes(jsonl(lines))
    made = await client.files.create(file=path.open("rb"), purpose="batch")
    return made.id


async def create_batch(client: openai.AsyncOpenAI, lines: list[dict[str, Any]], tmp: Path) -> Batch:
    """Upload the lines and start a 24 h chat batch on them, as a user does."""
    return await client.batches.create(
        input_file_id=await upload(client, lines, tmp),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )


async def finished(
    client: openai.AsyncOpenAI, batch_id: str, limit: float = 30.0, status: str = "completed"
) -> Batch:
    seen: list[Batch] = []

    async def check() -> bool:
        seen.append(await client.batches.retrieve(batch_id))
        return seen[-1].status == status

    await until(check, limit, interval=0.1, what=f"batch {batch_id} {status}")
    return seen[-1]


async def lines_of(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await client.files.content(file_id)
    return [orjson.loads(x) for x in content.content.splitlines() if x.strip()]


async def rows_per_line(pool: asyncpg.Pool, tenant: str) -> dict[str, list[asyncpg.Record]]:
    """The usage rows of the tenant's batch lines, by line request id."""
    rows = await pool.fetch(
        "SELECT u.request_id, u.status, u.counted FROM usage_events u"
        " JOIN tenants t ON t.id = u.tenant_id"
        " WHERE t.name = $1 AND u.request_id LIKE 'batch_req_%'",
        tenant,
    )
    out: dict[str, list[asyncpg.Record]] = {}
    for r in rows:
        out.setdefault(r["request_id"], []).append(r)
    return out
