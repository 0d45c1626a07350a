"""OpenAI's own Responses API (``POST /v1/responses``) for ``FakeOpenAI``.

The answer has a reasoning item before its message (as OpenAI's reasoning
models answer), so a test can tell a passed-through answer from one the
gateway translated from chat: chat has no reasoning items. Usage reports
cached input tokens and reasoning tokens. ``cut`` (after the model's
``fake-`` prefix is removed) ends the stream after the first text delta;
``failed`` ends it there with ``response.failed``, as OpenAI does when the
model errs mid-answer.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

TEXT = ["Hello", " from", " OpenAI's", " Responses."]
REASONING = "Thinking about a greeting."
USAGE = {
    "input_tokens": 1200,
    "input_tokens_details": {"cached_tokens": 1024},
    "output_tokens": 30,
    "output_tokens_details": {"reasoning_tokens": 12},
    "total_tokens": 1230,
}


def _response(body: dict[str, Any], status: str, output: list[Any], usage: Any) -> dict[str, Any]:
    return {
        "id": "resp_upstream123",
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body.get("model"),
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": "low", "summary": None},
        "store": body.get("store", True),
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": {},
    }


def _items() -> tuple[dict[str, Any], dict[str, Any]]:
    reasoning = {
        "id": "rs_upstream1",
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": REASONING}],
    }
    part = {"type": "output_text", "text": "".join(TEXT), "annotations": []}
    message = {
        "id": "msg_upstream1",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [part],
    }
    return reasoning, message


async def serve(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    reasoning, message = _items()
    if not body.get("stream"):
        return web.json_response(_response(body, "completed", [reasoning, message], USAGE))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    seq = 0

    async def emit(kind: str, **fields: Any) -> None:
        nonlocal seq
        event = {"type": kind, "sequence_number": seq, **fields}
        seq += 1
        await resp.write(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n")

    await emit("response.created", response=_response(body, "in_progress", [], None))
    await emit("response.in_progress", response=_response(body, "in_progress", [], None))
    await emit("response.output_item.added", output_index=0, item=reasoning)
    await emit("response.output_item.done", output_index=0, item=reasoning)
    opened = {**message, "status": "in_progress", "content": []}
    await emit("response.output_item.added", output_index=1, item=opened)
    empty = {"type": "output_text", "text": "", "annotations": []}
    ids = {"item_id": message["id"], "output_index": 1, "content_index": 0}
    await emit("response.content_part.added", **ids, part=empty)
    for piece in TEXT:
        await emit("response.output_text.delta", **ids, delta=piece, logprobs=[])
        if body["model"] == "cut":
            request.transport.close()  # type: ignore[union-attr]
            return resp
        if body["model"] == "failed":
            failed = _response(body, "failed", [], None)
            failed["error"] = {"code": "server_error", "message": "The model had an error."}
            await emit("response.failed", response=failed)
            return resp
    await emit("response.output_text.done", **ids, text="".join(TEXT), logprobs=[])
    await emit("response.content_part.done", **ids, part=message["content"][0])
    await emit("response.output_item.done", output_index=1, item=message)
    done = _response(body, "completed", [reasoning, message], USAGE)
    await emit("response.completed", response=done)
    return resp
