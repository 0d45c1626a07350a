"""A chat answer as an Anthropic ``Message``, and chat usage as Anthropic's.

Chat's ``prompt_tokens`` includes cached tokens, Anthropic's
``input_tokens`` excludes them; the split in ``prompt_tokens_details``
(``cached_tokens``, ``cache_write_tokens``) is given back as
``cache_read_input_tokens`` / ``cache_creation_input_tokens``. Lost on the
way back: thinking blocks, citations and which stop sequence matched.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.providers.translated import positive_int

Json = dict[str, Any]

# chat finish_reason -> Anthropic stop_reason
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def usage(chat_usage: Any) -> Json:
    """Chat usage as Anthropic's (see the module docstring)."""
    u = chat_usage if isinstance(chat_usage, dict) else {}
    details = u.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    read = positive_int(details.get("cached_tokens"))
    write = positive_int(details.get("cache_write_tokens"))
    out: Json = {
        "input_tokens": max(positive_int(u.get("prompt_tokens")) - read - write, 0),
        "output_tokens": positive_int(u.get("completion_tokens")),
    }
    if read or write:
        out["cache_read_input_tokens"] = read
        out["cache_creation_input_tokens"] = write
    return out


def _input(arguments: Any) -> Json:
    """A tool call's arguments as the object Anthropic's ``input`` is; a
    model's malformed JSON becomes ``{}`` rather than failing the answer."""
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = orjson.loads(arguments or "{}")
    except (orjson.JSONDecodeError, TypeError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def stop_reason(finish: Any) -> str:
    return STOP_REASONS.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"


def message(chat: Json, message_id: str) -> Json:
    """A ``chat.completion`` as an Anthropic ``Message`` (its first choice)."""
    choices = chat.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    msg = choice.get("message") or {}
    content: list[Json] = []
    text = msg.get("content") or msg.get("refusal")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") or {}
        block = {"type": "tool_use", "id": call.get("id"), "name": fn.get("name")}
        content.append({**block, "input": _input(fn.get("arguments"))})
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": chat.get("model") or "",
        "content": content,
        "stop_reason": stop_reason(choice.get("finish_reason")),
        "stop_sequence": None,
        "usage": usage(chat.get("usage")),
    }
