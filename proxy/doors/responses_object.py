"""The Response object and its output items, from a chat completion's parts.

Shared by the JSON answer (``reply``) and the stream (whose
``response.created`` and ``response.completed`` carry the same object, in
progress and finished), so both say the same thing about a request.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import orjson

from proxy.doors.responses_request import Asked

Json = dict[str, Any]

# Chat finish reasons that leave a response incomplete, and why.
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


class Ids:
    """A response's id and its items' ids (one random stem, numbered), so a
    stream translated twice from the same ids gives the same events."""

    def __init__(
        self,
        stem: str | None = None,
        created_at: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stem = stem or secrets.token_hex(16)
        self.clock = clock
        self.created_at = created_at if created_at is not None else int(clock())
        self._n = 0

    @property
    def response(self) -> str:
        return f"resp_{self.stem}"

    def item(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self.stem}{self._n:03d}"


def response(
    ids: Ids,
    ask: Asked,
    model: str,
    status: str,
    output: list[Json],
    usage: Json | None = None,
    finish: str | None = None,
    error: Json | None = None,
) -> Json:
    reason = INCOMPLETE.get(finish or "")
    if status == "completed" and reason is not None:
        status = "incomplete"
    out: Json = {
        "id": ids.response,
        "object": "response",
        "created_at": ids.created_at,
        "status": status,
        "completed_at": int(ids.clock()) if status == "completed" else None,
        "error": error,
        "incomplete_details": {"reason": reason} if status == "incomplete" else None,
        "instructions": ask.instructions,
        "max_output_tokens": ask.max_output_tokens,
        "model": model,
        "output": output,
        "parallel_tool_calls": ask.parallel_tool_calls,
        "previous_response_id": ask.previous_response_id,
        "reasoning": {"effort": (ask.reasoning or {}).get("effort"), "summary": None},
        "store": ask.store,
        "temperature": ask.temperature if ask.temperature is not None else 1.0,
        "text": ask.text,
        "tool_choice": ask.tool_choice,
        "tools": [_tool(t) for t in ask.tools],
        "top_p": ask.top_p if ask.top_p is not None else 1.0,
        "truncation": "disabled",
        "metadata": ask.metadata,
    }
    if usage is not None:  # null is not allowed: absent until known
        out["usage"] = usage
    if ask.user is not None:
        out["user"] = ask.user
    return out


def _tool(tool: Json) -> Json:
    return {
        "type": "function",
        "name": tool.get("name"),
        "description": tool.get("description"),
        "parameters": tool.get("parameters") or {"type": "object"},
        "strict": tool.get("strict", True),
    }


def usage(chat: Any) -> Json | None:
    """Chat ``usage`` in the Responses shape (None when the provider sent none)."""
    if not isinstance(chat, dict):
        return None
    prompt, completion = (
        int(chat.get("prompt_tokens") or 0),
        int(chat.get("completion_tokens") or 0),
    )
    cached = (chat.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (chat.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": int(cached), "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": int(reasoning)},
        "total_tokens": int(chat.get("total_tokens") or prompt + completion),
    }


def text_part(text: str) -> Json:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message(item_id: str, parts: list[Json], status: str = "completed") -> Json:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": parts,
    }


def function_call(item_id: str, call_id: str, name: str, arguments: str, status: str) -> Json:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def from_chat(body: bytes, ids: Ids, ask: Asked) -> Json:
    """A non-stream chat completion (JSON) as a Response."""
    chat = orjson.loads(body)
    choice = (chat.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    output: list[Json] = []
    parts = []
    if msg.get("content"):
        parts.append(text_part(str(msg["content"])))
    if msg.get("refusal"):
        parts.append({"type": "refusal", "refusal": str(msg["refusal"])})
    if parts:
        output.append(message(ids.item("msg"), parts))
    for call in msg.get("tool_calls") or []:
        fn = call.get("function") or {}
        output.append(
            function_call(
                ids.item("fc"),
                str(call.get("id")),
                str(fn.get("name")),
                str(fn.get("arguments") or ""),
                "completed",
            )
        )
    model = str(chat.get("model") or ask.model)
    finish = choice.get("finish_reason")
    return response(ids, ask, model, "completed", output, usage(chat.get("usage")), finish)


def as_chat_turn(output: list[Json]) -> Json:
    """A Response's output as the assistant turn of a chat history (what a
    ``previous_response_id`` continues from)."""
    text = "".join(
        p.get("text") or p.get("refusal") or ""
        for item in output
        if item.get("type") == "message"
        for p in item.get("content") or []
    )
    calls = [
        {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        for item in output
        if item.get("type") == "function_call"
    ]
    turn: Json = {"role": "assistant", "content": text or None}
    if calls:
        turn["tool_calls"] = calls
    return turn
