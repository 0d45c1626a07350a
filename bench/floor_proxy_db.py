"""Yardstick: the pass-through of floor_proxy.py plus one Postgres usage row per request.

    python bench/floor_proxy_db.py PORT UPSTREAM_BASE DSN [--billing inline|batch]

On top of floor_proxy.py's work it reads ``usage`` from the answer (the JSON
body; for a stream, the last ``data:`` event that has a ``usage`` object) and
records one row per request in table ``usage_log`` (created if missing):

- ``--billing inline``: the INSERT is awaited after the answer is written and
  before the handler returns, so the connection's next request waits for it;
- ``--billing batch``: rows are queued and COPYed every 20 ms, 500 at a time.

What "bill every request in Postgres" costs at the least; Tollway's billing
path is measured against it (bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
from aiohttp import web
from floor_proxy import (
    DROP_REQUEST,
    DROP_RESPONSE,
    SESSION,
    UPSTREAM,
    install_uvloop,
    serve,
    session_ctx,
)

COLUMNS = ("key", "model", "prompt_tokens", "completion_tokens", "status", "latency_ms")
CREATE = (
    "CREATE TABLE IF NOT EXISTS usage_log (id bigserial PRIMARY KEY, ts timestamptz DEFAULT now(),"
    " key text, model text, prompt_tokens int, completion_tokens int, status int, latency_ms real)"
)
INSERT = (
    "INSERT INTO usage_log (key, model, prompt_tokens, completion_tokens, status, latency_ms)"
    " VALUES ($1, $2, $3, $4, $5, $6)"
)
STREAM_TAIL = 4096  # a stream's usage event is in its last few KB
FLUSH_EVERY_S, COPY_ROWS = 0.02, 500
Row = tuple[str, str, int, int, int, float]
POOL = web.AppKey("pool", asyncpg.Pool)
MODE = web.AppKey("billing", str)
DSN = web.AppKey("dsn", str)
QUEUE = web.AppKey("queue", list)


def usage_of(answer: bytes, stream: bool) -> tuple[int, int]:
    """(prompt, completion) tokens from an answer; (0, 0) when it has none."""
    try:
        if stream:
            at = answer.rfind(b'"usage":{')
            if at < 0:
                return 0, 0
            start = answer.rfind(b"data: ", 0, at) + len(b"data: ")
            usage = orjson.loads(answer[start : answer.find(b"\n", at)]).get("usage") or {}
        else:
            usage = orjson.loads(answer).get("usage") or {}
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    except (orjson.JSONDecodeError, ValueError, AttributeError):
        return 0, 0


async def proxy(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    body = await request.read()
    try:
        req: Any = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        req = {}
    stream = isinstance(req, dict) and bool(req.get("stream"))
    headers = {k: v for k, v in request.headers.items() if k.lower() not in DROP_REQUEST}
    url = request.app[UPSTREAM] + request.rel_url.path_qs
    answer = b""
    async with request.app[SESSION].request(request.method, url, data=body, headers=headers) as up:
        kept = {k: v for k, v in up.headers.items() if k.lower() not in DROP_RESPONSE}
        resp = web.StreamResponse(status=up.status, headers=kept)
        if up.content_length is not None:
            resp.content_length = up.content_length
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
            answer = (answer + chunk)[-STREAM_TAIL:] if stream else answer + chunk
        await resp.write_eof()
        status = up.status
    prompt, completion = usage_of(answer, stream)
    key = request.headers.get("Authorization", "")[-8:]
    model = str(req.get("model", "")) if isinstance(req, dict) else ""
    row: Row = (key, model, prompt, completion, status, (time.perf_counter() - started) * 1000)
    if request.app[MODE] == "inline":
        await request.app[POOL].execute(INSERT, *row)
    else:
        request.app[QUEUE].append(row)
    return resp


async def flush_forever(app: web.Application) -> None:
    """Every 20 ms, COPY what is queued; a failed batch is reported and dropped
    (a real proxy would spool it), so the yardstick keeps serving."""
    while True:
        await asyncio.sleep(FLUSH_EVERY_S)
        rows = app[QUEUE][:]
        app[QUEUE].clear()
        for i in range(0, len(rows), COPY_ROWS):
            try:
                await app[POOL].copy_records_to_table(
                    "usage_log", records=rows[i : i + COPY_ROWS], columns=COLUMNS
                )
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                print("billing flush failed:", exc, flush=True)


async def db_ctx(app: web.Application) -> AsyncIterator[None]:
    app[POOL] = pool = await asyncpg.create_pool(app[DSN], min_size=4, max_size=10)
    await pool.execute(CREATE)
    app[QUEUE] = []
    # A standalone script, not the proxy: proxy/core/tasks.py's TaskGroup is not used here.
    flusher = asyncio.create_task(flush_forever(app)) if app[MODE] == "batch" else None  # noqa: TID251
    yield
    if flusher is not None:
        flusher.cancel()
    await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("upstream")
    parser.add_argument("dsn")
    parser.add_argument("--billing", choices=["inline", "batch"], default="inline")
    args = parser.parse_args()
    install_uvloop()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[UPSTREAM], app[DSN], app[MODE] = args.upstream.rstrip("/"), args.dsn, args.billing
    app.cleanup_ctx.extend([session_ctx, db_ctx])
    serve(app, args.port, proxy)


if __name__ == "__main__":
    main()
