"""Where the text is in requests and replies, for guardrails to read and rewrite.

Requests: chat ``messages[].content`` (a string or text parts) and tool-call
arguments, legacy ``prompt``, embeddings ``input``. Replies: each choice's
``message.content`` / ``text`` and tool-call arguments. Token-id prompts
(lists of integers) carry no text and are left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

Rewrite = Callable[[str], str]


def rewrite_request(body: dict[str, Any], fn: Rewrite) -> None:
    """Apply ``fn`` to every text of the request, in place."""
    for msg in body.get("messages") or ():
        if isinstance(msg, dict):
            _message(msg, fn)
    for key in ("prompt", "input"):
        value = body.get(key)
        if isinstance(value, str):
            body[key] = fn(value)
        elif isinstance(value, list):
            body[key] = [fn(v) if isinstance(v, str) else v for v in value]


def _message(msg: dict[str, Any], fn: Rewrite) -> None:
    content = msg.get("content")
    if isinstance(content, str):
        msg["content"] = fn(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                part["text"] = fn(part["text"])
    for call in msg.get("tool_calls") or ():
        func = call.get("function") if isinstance(call, dict) else None
        if isinstance(func, dict) and isinstance(func.get("arguments"), str):
            func["arguments"] = fn(func["arguments"])


def rewrite_reply(raw: bytes, fn: Rewrite) -> bytes | None:
    """The reply with ``fn`` applied to its answer texts (None: not JSON, left as is)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):
            choice["text"] = fn(choice["text"])
        msg = choice.get("message")
        if isinstance(msg, dict):
            _message(msg, fn)
    return orjson.dumps(obj)
