"""An Anthropic Messages request as the chat completion the pipeline runs.

What chat cannot carry does not reach a non-Anthropic provider: ``top_k``
and ``thinking`` (and thinking blocks in the history) are dropped; server
tools, documents and images inside a ``tool_result`` are refused with a 400
naming them. An Anthropic provider gets the client's own body instead
(``MessagesDoor.native_body``).
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.core import tokens
from proxy.core.errors import InvalidRequest

Json = dict[str, Any]

# Anthropic tool_choice type -> chat tool_choice
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def _invalid(message: str, param: str | None = None) -> InvalidRequest:
    return InvalidRequest(message, param=param)


def _image_url(block: Json, where: str) -> Json:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source, dict):
        media, data = source.get("media_type"), source.get("data")
        if isinstance(media, str) and isinstance(data, str):
            return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
    if kind == "url" and isinstance(source, dict) and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise _invalid("Image blocks need a base64 or url source.", f"{where}.source")


def _text_part(block: Json, where: str) -> Json:
    text = block.get("text")
    if not isinstance(text, str):
        raise _invalid("Text blocks need a 'text' string.", f"{where}.text")
    part: Json = {"type": "text", "text": text}
    if "cache_control" in block:  # kept: an Anthropic target honours it
        part["cache_control"] = block["cache_control"]
    return part


def _blocks(content: Any, where: str) -> list[Json]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _invalid("'content' must be a string or an array of content blocks.", where)
    for i, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _invalid("Content blocks must be objects with a 'type'.", f"{where}[{i}]")
    return content


def _tool_result(block: Json, where: str) -> Json:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str):
        raise _invalid("tool_result blocks need a 'tool_use_id'.", f"{where}.tool_use_id")
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        parts = _blocks(content, f"{where}.content")
        if any(p["type"] != "text" for p in parts):
            raise _invalid(
                "Only text can be returned in a tool_result to this model's provider.",
                f"{where}.content",
            )
        text = "".join(p.get("text") or "" for p in parts)
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def _user(content: Any, where: str) -> list[Json]:
    """One Anthropic user turn: its tool results (each a chat ``tool``
    message, first, as chat wants them right after the assistant's calls),
    then one user message with the rest."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    results: list[Json] = []
    parts: list[Json] = []
    for i, block in enumerate(_blocks(content, where)):
        at, kind = f"{where}[{i}]", block["type"]
        if kind == "text":
            parts.append(_text_part(block, at))
        elif kind == "image":
            parts.append(_image_url(block, at))
        elif kind == "tool_result":
            results.append(_tool_result(block, at))
        else:
            raise _invalid(f"Content block type {kind!r} is not supported here.", f"{at}.type")
    if parts:
        results.append({"role": "user", "content": parts})
    return results


def _assistant(content: Any, where: str) -> Json:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    text: list[str] = []
    calls: list[Json] = []
    for i, block in enumerate(_blocks(content, where)):
        at, kind = f"{where}[{i}]", block["type"]
        if kind == "text":
            text.append(_text_part(block, at)["text"])
        elif kind == "tool_use":
            name, args = block.get("name"), block.get("input")
            if not isinstance(name, str) or not isinstance(block.get("id"), str):
                raise _invalid("tool_use blocks need an 'id' and a 'name'.", at)
            fn = {"name": name, "arguments": orjson.dumps(args or {}).decode()}
            calls.append({"id": block["id"], "type": "function", "function": fn})
        elif kind not in ("thinking", "redacted_thinking"):  # chat cannot carry them
            raise _invalid(f"Content block type {kind!r} is not supported here.", f"{at}.type")
    msg: Json = {"role": "assistant", "content": "".join(text) or None}
    if calls:
        msg["tool_calls"] = calls
    return msg


def _system(system: Any) -> Json | None:
    if system is None or system == "":
        return None
    if isinstance(system, str):
        return {"role": "system", "content": system}
    blocks = _blocks(system, "system")
    parts = [_text_part(b, f"system[{i}]") for i, b in enumerate(blocks)]
    return {"role": "system", "content": parts} if parts else None


def _messages(body: Json) -> list[Json]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty array.", "messages")
    out: list[Json] = []
    system = _system(body.get("system"))
    if system is not None:
        out.append(system)
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        role = msg.get("role") if isinstance(msg, dict) else None
        if role == "user":
            out.extend(_user(msg.get("content"), f"{where}.content"))
        elif role == "assistant":
            out.append(_assistant(msg.get("content"), f"{where}.content"))
        else:
            raise _invalid("Message roles must be 'user' or 'assistant'.", f"{where}.role")
    return out


def _tool(tool: Any, where: str) -> Json:
    if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise _invalid(f"Tool type {kind!r} is not supported here; use custom tools.", where)
    if not isinstance(tool.get("name"), str):
        raise _invalid("Tools need a 'name'.", f"{where}.name")
    fn: Json = {"name": tool["name"]}
    if tool.get("description"):
        fn["description"] = tool["description"]
    fn["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
    return {"type": "function", "function": fn}


def _tools(body: Json, out: Json) -> None:
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise _invalid("'tools' must be an array.", "tools")
        out["tools"] = [_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]
    choice = body.get("tool_choice")
    if choice is None:
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool" and isinstance(choice, dict) and isinstance(choice.get("name"), str):
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif kind in _TOOL_CHOICES:
        out["tool_choice"] = _TOOL_CHOICES[kind]
    else:
        raise _invalid("'tool_choice.type' must be auto, any, tool or none.", "tool_choice")
    if isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True and tools:
        out["parallel_tool_calls"] = False


def _sampling(body: Json, out: Json) -> None:
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    stop = body.get("stop_sequences")
    if stop:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _invalid("'stop_sequences' must be an array of strings.", "stop_sequences")
        out["stop"] = stop
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]


def to_chat(body: Json, *, counting: bool = False) -> Json:
    """A Messages body as a chat completions body; ``counting``: for
    ``count_tokens``, which takes no ``max_tokens``."""
    out: Json = {"model": body.get("model"), "messages": _messages(body)}
    max_tokens = body.get("max_tokens")
    if not counting:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise _invalid("'max_tokens' is required: a positive integer.", "max_tokens")
        out["max_tokens"] = max_tokens
    _sampling(body, out)
    _tools(body, out)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("'stream' must be a boolean.", "stream")
    if stream:
        # The usage chunk carries the counts message_delta reports.
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def count_tokens(body: Json) -> Json:
    """``POST /v1/messages/count_tokens``: the prompt tokens of the chat
    request the body becomes, counted as the gateway counts a prompt it must
    count itself (``proxy.core.tokens``), tool definitions included.
    Proportional to the body: run it off the event loop."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("'model' is required: a string.", "model")
    chat = to_chat(body, counting=True)
    count = tokens.count_prompt(chat, "chat", model)
    if chat.get("tools"):
        count += tokens.count_text(orjson.dumps(chat["tools"]).decode(), model)
    return {"input_tokens": count}
