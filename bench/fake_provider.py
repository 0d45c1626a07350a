"""A fast fake OpenAI provider for benchmarks (and wire-format checks).

usage: fake_provider.py PORT [--chunks N] [--chunk-delay-ms MS] [--embedding-dims D]
                         [--long-chunks N] [--long-gap-ms MS]

It answers POST /v1/chat/completions, /v1/completions and /v1/embeddings in
OpenAI's exact wire format, with no artificial delay unless asked, so a
benchmark measures the proxy in front of it rather than the fake. Streams are
what OpenAI sends: a role chunk (chat only), N content chunks each written
separately (as a real provider's tokens are), a finish chunk, a usage chunk
with ``choices: []`` when ``stream_options.include_usage`` is true (every other
chunk then carries ``"usage": null``, as OpenAI's do), then ``data: [DONE]``.
The answer text and token counts are deterministic, so a proxy's relayed
bytes and billed usage can be checked exactly.

A request for a model whose name starts with ``bench-long`` gets the long
answer instead: ``--long-chunks`` content chunks ``--long-gap-ms`` apart
(200 and 25 ms: a few seconds of tokens, like a real model's), so one fake
serves both the short scenarios and the long-stream one in the same run.

A request for an embedding model whose name starts with ``bench-fresh`` gets
a new random vector of 384 dimensions each time (the others get a fixed one),
so a semantic cache in front of it misses on every request.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import random
import struct
import time
from typing import Any

import orjson
from aiohttp import web

WORDS = ("Hello", ",", " this", " is", " a", " fake", " answer", " from", " the", " bench", ".")
FINGERPRINT = "fp_tollway_bench"
_ids = itertools.count(1)

CHUNKS = web.AppKey("chunks", int)
DELAY = web.AppKey("chunk_delay", float)
DIMS = web.AppKey("embedding_dims", int)
LONG = web.AppKey("long", tuple[int, float])  # (chunks, gap in seconds) for bench-long*
LONG_MODEL = "bench-long"
FRESH_MODEL, FRESH_DIMS = "bench-fresh", 384


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    err = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    body = orjson.dumps({"error": err})
    return web.Response(status=status, body=body, content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "We could not parse the JSON body of your request.")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return _error(400, "you must provide a model parameter", "model")
    return body


def _pieces(n: int) -> list[str]:
    return [WORDS[i % len(WORDS)] for i in range(n)]


def _prompt_tokens(body: dict[str, Any]) -> int:
    """A cheap, deterministic stand-in for tokenizing the prompt."""
    chars = len(orjson.dumps(body.get("messages") or body.get("prompt") or body.get("input")))
    return max(1, chars // 4)


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _chunks(request: web.Request, body: dict[str, Any]) -> int:
    long = body["model"].startswith(LONG_MODEL)
    return request.app[LONG][0] if long else request.app[CHUNKS]


def _json(obj: dict[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


def _wants_usage(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def _chat_choices(text: str | None, role: bool, finish: str | None) -> list[dict[str, Any]]:
    delta: dict[str, Any] = {}
    if role:
        delta = {"role": "assistant", "content": "", "refusal": None}
    elif text is not None:
        delta = {"content": text}
    return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]


def _text_choices(text: str, finish: str | None) -> list[dict[str, Any]]:
    return [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]


async def _stream(
    request: web.Request, body: dict[str, Any], chat: bool, pieces: list[str]
) -> web.StreamResponse:
    usage = _wants_usage(body)
    base: dict[str, Any] = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-bench{next(_ids):016x}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": body["model"],
        "system_fingerprint": FINGERPRINT,
    }

    def event(choices: list[dict[str, Any]], usage_value: Any = None) -> bytes:
        obj = {**base, "choices": choices}
        if usage:
            obj["usage"] = usage_value
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    events = [event(_chat_choices(None, True, None))] if chat else []
    for p in pieces:
        events.append(event(_chat_choices(p, False, None) if chat else _text_choices(p, None)))
    events.append(event(_chat_choices(None, False, "stop") if chat else _text_choices("", "stop")))
    if usage:
        events.append(event([], _usage(_prompt_tokens(body), len(pieces))))
    events.append(b"data: [DONE]\n\n")

    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    delay = request.app[DELAY]
    if body["model"].startswith(LONG_MODEL):
        delay = request.app[LONG][1]
    for ev in events:
        await resp.write(ev)  # one write per event, like a provider emitting tokens
        if delay:
            await asyncio.sleep(delay)
    await resp.write_eof()
    return resp


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    pieces = _pieces(_chunks(request, body))
    if body.get("stream") is True:
        return await _stream(request, body, True, pieces)
    return _json(
        {
            "id": f"chatcmpl-bench{next(_ids):016x}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "".join(pieces),
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(_prompt_tokens(body), len(pieces)),
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
        }
    )


async def completions(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    pieces = _pieces(request.app[CHUNKS])
    if body.get("stream") is True:
        return await _stream(request, body, False, pieces)
    return _json(
        {
            "id": f"cmpl-bench{next(_ids):016x}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": _text_choices("".join(pieces), "stop"),
            "usage": _usage(_prompt_tokens(body), len(pieces)),
            "system_fingerprint": FINGERPRINT,
        }
    )


def _embedding(index: int, dims: int, b64: bool, fresh: bool = False) -> dict[str, Any]:
    if fresh:
        vec = [random.random() - 0.5 for _ in range(FRESH_DIMS)]
        dims = FRESH_DIMS
    else:
        vec = [((index + i) % 17 - 8) / 16 for i in range(dims)]
    value: Any = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if b64 else vec
    return {"object": "embedding", "index": index, "embedding": value}


async def embeddings(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    raw = body.get("input")
    # A string or a token array is one input; a list of either is many.
    one = isinstance(raw, str) or (isinstance(raw, list) and all(isinstance(t, int) for t in raw))
    count = 1 if one else len(raw) if isinstance(raw, list) else 0
    if count == 0:
        return _error(400, "'input' must be a non-empty string or array", "input")
    dims = body.get("dimensions") if isinstance(body.get("dimensions"), int) else None
    b64 = body.get("encoding_format") == "base64"
    prompt = _prompt_tokens(body)
    fresh = str(body["model"]).startswith(FRESH_MODEL)
    return _json(
        {
            "object": "list",
            "data": [_embedding(i, dims or request.app[DIMS], b64, fresh) for i in range(count)],
            "model": body["model"],
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }
    )


async def otlp_sink(request: web.Request) -> web.Response:
    """An OTLP/HTTP trace receiver that accepts and discards (the tracing
    targets of run.py and instructions.py export here): an empty body is an
    ``ExportTraceServiceResponse`` with nothing rejected."""
    await request.read()
    return web.Response(body=b"", content_type="application/x-protobuf")


def build_app(
    chunks: int = 20,
    chunk_delay_ms: float = 0.0,
    dims: int = 1536,
    long: tuple[int, float] = (200, 25.0),
) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[CHUNKS] = chunks
    app[LONG] = (long[0], long[1] / 1000)
    app[DELAY] = chunk_delay_ms / 1000
    app[DIMS] = dims
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/traces", otlp_sink)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("port", type=int)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    p.add_argument("--chunk-delay-ms", type=float, default=0.0, help="pause after each event")
    p.add_argument("--embedding-dims", type=int, default=1536)
    p.add_argument("--long-chunks", type=int, default=200, help=f"chunks for {LONG_MODEL}*")
    p.add_argument("--long-gap-ms", type=float, default=25.0, help=f"gap for {LONG_MODEL}*")
    args = p.parse_args()
    try:
        import uvloop  # same loop as the proxies under test: like compares with like

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    app = build_app(
        args.chunks, args.chunk_delay_ms, args.embedding_dims, (args.long_chunks, args.long_gap_ms)
    )
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()
