"""What the guardrail and moderation tests share: a gateway started with a
``guardrails:`` section, and a fake's plain text answer, whole or streamed."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from tests.conftest import Gateway, StartGateway, gateway_config

_BASE = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
_USAGE = {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


async def start_guarded(
    start_gateway: StartGateway, url: str, guardrails: dict[str, Any]
) -> Gateway:
    """The gateway in front of the OpenAI-compatible fake at ``url``."""
    return await start_gateway(gateway_config(url, guardrails=guardrails))


async def text_reply(
    request: web.Request,
    body: dict[str, Any],
    text: str,
    pieces: list[str],
    *,
    opening: bool = False,
) -> web.StreamResponse:
    """``text`` as a chat answer: whole, or, when ``body`` asks to stream,
    one event per piece (after a role-only event when ``opening``, as
    OpenAI starts), the finish and ``[DONE]``."""
    if not body.get("stream"):
        msg = {"role": "assistant", "content": text}
        choice = {"index": 0, "finish_reason": "stop", "message": msg}
        return web.json_response(
            {**_BASE, "object": "chat.completion", "choices": [choice], "usage": _USAGE}
        )
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    deltas = [{"role": "assistant", "content": ""}] if opening else []
    deltas += [{"content": piece} for piece in pieces]
    for delta in deltas:
        choice = {"index": 0, "delta": delta, "finish_reason": None}
        await resp.write(b"data: " + orjson.dumps({**_BASE, "choices": [choice]}) + b"\n\n")
    end = {"index": 0, "delta": {}, "finish_reason": "stop"}
    await resp.write(b"data: " + orjson.dumps({**_BASE, "choices": [end]}) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    return resp
