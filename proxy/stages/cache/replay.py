"""Cache entries in and out: a finished stream made whole, a hit served.

A cache entry is always the non-stream OpenAI response, so one entry serves
both kinds of request: a streamed answer is assembled into the response
OpenAI would have returned without ``stream`` (content, refusal and tool
calls joined per choice), and a hit for ``stream: true`` is replayed as a
proper SSE stream — a first chunk with the role and the whole content (and
tool calls), a chunk with the finish reason per choice, the usage chunk when
the client asked for ``stream_options.include_usage``, then ``[DONE]``.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from proxy.core.record import UsageRecord
from proxy.core.sse import DONE, SSE_HEADERS, data_event
from proxy.core.usage import Usage
from proxy.stages.base import Door
from proxy.stages.cache.store import HEADER, Lookup, usage_of


def _usage_dict(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


class _Choice:
    __slots__ = ("finish", "index", "parts", "refusal", "role", "tools")

    def __init__(self, index: int) -> None:
        self.index = index
        self.role = "assistant"
        self.parts: list[str] = []
        self.refusal: list[str] = []
        self.tools: dict[int, dict[str, Any]] = {}
        self.finish: str | None = None

    def add_delta(self, delta: dict[str, Any]) -> None:
        if isinstance(delta.get("role"), str):
            self.role = delta["role"]
        if isinstance(delta.get("content"), str):
            self.parts.append(delta["content"])
        if isinstance(delta.get("refusal"), str):
            self.refusal.append(delta["refusal"])
        for call in delta.get("tool_calls") or ():
            tool = self.tools.setdefault(
                call.get("index", 0), {"id": None, "type": "function", "name": "", "args": []}
            )
            tool["id"] = call.get("id") or tool["id"]
            tool["type"] = call.get("type") or tool["type"]
            fn = call.get("function") or {}
            tool["name"] += fn.get("name") or ""
            tool["args"].append(fn.get("arguments") or "")

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "role": self.role,
            "content": "".join(self.parts) if self.parts or not self.tools else None,
            "refusal": "".join(self.refusal) or None,
        }
        if self.tools:
            msg["tool_calls"] = [
                {
                    "id": t["id"],
                    "type": t["type"],
                    "function": {"name": t["name"], "arguments": "".join(t["args"])},
                }
                for _, t in sorted(self.tools.items())
            ]
        return msg


def assemble(payloads: list[bytes], endpoint: str, usage: Usage) -> bytes | None:
    """The non-stream response for a whole stream; None if it cannot be made."""
    head: dict[str, Any] | None = None
    choices: dict[int, _Choice] = {}
    reported: Any = None
    for data in payloads:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or "error" in obj:
            return None
        head = head or obj
        reported = obj.get("usage") or reported
        for raw in obj.get("choices") or ():
            choice = choices.setdefault(raw.get("index", 0), _Choice(raw.get("index", 0)))
            if endpoint == "completions":
                choice.parts.append(raw.get("text") or "")
            else:
                choice.add_delta(raw.get("delta") or {})
            choice.finish = raw.get("finish_reason") or choice.finish
    if head is None or not choices:
        return None
    out: dict[str, Any] = {
        "id": head.get("id"),
        "object": "text_completion" if endpoint == "completions" else "chat.completion",
        "created": head.get("created"),
        "model": head.get("model"),
    }
    if head.get("system_fingerprint") is not None:
        out["system_fingerprint"] = head["system_fingerprint"]
    ordered = [choices[i] for i in sorted(choices)]
    if endpoint == "completions":
        out["choices"] = [
            {
                "text": "".join(c.parts),
                "index": c.index,
                "logprobs": None,
                "finish_reason": c.finish,
            }
            for c in ordered
        ]
    else:
        out["choices"] = [
            {"index": c.index, "message": c.message(), "logprobs": None, "finish_reason": c.finish}
            for c in ordered
        ]
    out["usage"] = reported if isinstance(reported, dict) else _usage_dict(usage)
    return orjson.dumps(out)


def replay_events(body: bytes, endpoint: str, include_usage: bool) -> bytes:
    """A cached non-stream response as the SSE stream OpenAI would send."""
    full = orjson.loads(body)
    chat = endpoint != "completions"
    base = {
        "id": full.get("id"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": full.get("created"),
        "model": full.get("model"),
    }
    if full.get("system_fingerprint") is not None:
        base["system_fingerprint"] = full["system_fingerprint"]
    out = []
    for choice in full.get("choices") or ():
        index, finish = choice.get("index", 0), choice.get("finish_reason")
        if chat:
            msg = choice.get("message") or {}
            delta = {k: v for k, v in msg.items() if v is not None and k != "tool_calls"}
            delta.setdefault("content", "" if not msg.get("tool_calls") else None)
            if msg.get("tool_calls"):
                delta["tool_calls"] = [
                    {"index": i, **call} for i, call in enumerate(msg["tool_calls"])
                ]
            first = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
            last = {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}
        else:
            text = choice.get("text") or ""
            first = {"text": text, "index": index, "logprobs": None, "finish_reason": None}
            last = {"text": "", "index": index, "logprobs": None, "finish_reason": finish}
        out.append(data_event({**base, "choices": [first]}))
        out.append(data_event({**base, "choices": [last]}))
    if include_usage and full.get("usage"):
        out.append(data_event({**base, "choices": [], "usage": full["usage"]}))
    out.append(DONE)
    return b"".join(out)


async def serve_hit(
    request: web.Request | None,
    found: Lookup,
    record: UsageRecord,
    headers: dict[str, str],
    include_usage: bool,
    started: float,
    door: Door | None = None,
) -> web.StreamResponse:
    """Answer from the cache: no provider, settled as ``cached``."""
    entry = found.entry
    assert entry is not None
    usage = usage_of(entry, found.policy)
    headers = {**headers, HEADER: "hit"}
    return await serve_answer(
        request, entry.body, usage, record, headers, include_usage, started, door
    )


async def serve_answer(
    request: web.Request | None,
    body: bytes,
    usage: Usage,
    record: UsageRecord,
    headers: dict[str, str],
    include_usage: bool,
    started: float,
    door: Door | None = None,
) -> web.StreamResponse:
    """A stored answer (the non-stream response JSON) as JSON, or replayed
    as SSE for a stream; ``usage`` is what the hit bills. Shared with the
    semantic cache. Through a front door, in the door's shape."""
    record.cached = True
    record.status = 200
    record.usage = usage
    if not record.stream:
        answer = body if door is None else door.reply(body)
        return web.Response(body=answer, headers=headers, content_type="application/json")
    assert request is not None, "only a client's request is streamed"
    payload = replay_events(body, record.endpoint, include_usage)
    if door is not None:
        payload = door.stream().feed(payload)
    resp = web.StreamResponse(headers={**SSE_HEADERS, **headers})
    await resp.prepare(request)
    record.ttft_ms = (time.perf_counter() - started) * 1000
    try:
        await resp.write(payload)
    except ConnectionResetError:
        record.client_disconnected = True
        record.status = 499
    return resp
