"""Pure translation between OpenAI's chat shapes and Anthropic's Messages API.

No I/O: ``to_anthropic`` builds the request body and ``from_anthropic`` turns
a Message into an OpenAI ``chat.completion`` (or ``text_completion``); the
stream translator in ``anthropic.py`` uses the same usage and finish mapping.

Usage: Anthropic's ``input_tokens`` excludes cache reads and writes, OpenAI's
``prompt_tokens`` includes cached tokens; so ``prompt_tokens`` = input + cache
read + cache write, with the split kept in ``prompt_tokens_details``
(``cached_tokens`` = reads, ``cache_write_tokens`` = writes). Stream usage is
cumulative on Anthropic's side: ``message_start`` gives the first figures and
each ``message_delta`` replaces the fields it carries; nothing is summed.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from proxy.core.errors import InvalidRequest
from proxy.providers.translated import function_call, positive_int, prompt_text

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# Anthropic has no JSON mode; ``json_object`` becomes this system instruction.
JSON_OBJECT_HINT = "Respond with a single valid JSON object and nothing else."
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,(.*)", re.DOTALL)
_SYSTEM_ROLES = ("system", "developer")
Json = dict[str, Any]


def chat_messages(body: Json, endpoint: str) -> list[Any]:
    if endpoint == "completions":
        return [{"role": "user", "content": prompt_text(body)}]
    return list(body.get("messages") or [])


# -- request ------------------------------------------------------------------


def _image(url: Any, where: str) -> Json:
    if isinstance(url, str):
        m = _DATA_URL.fullmatch(url)
        if m:
            source = {"type": "base64", "media_type": m.group(1), "data": m.group(2)}
            return {"type": "image", "source": source}
        if url.startswith(("https://", "http://")):
            return {"type": "image", "source": {"type": "url", "url": url}}
    raise InvalidRequest(
        "Image URLs must be https:// URLs or base64 data URLs.", param=f"{where}.image_url"
    )


def _part(part: Any, where: str) -> Json:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        block: Json = {"type": "text", "text": part["text"]}
        if "cache_control" in part:
            block["cache_control"] = part["cache_control"]
        return block
    if kind == "image_url":
        image = part.get("image_url")
        return _image(image.get("url") if isinstance(image, dict) else image, where)
    raise InvalidRequest(f"Content part type {kind!r} is not supported by Anthropic.", param=where)


def _content(content: Any, where: str) -> str | list[Json]:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return [_part(p, f"{where}[{i}]") for i, p in enumerate(content)]
    if content is None:
        return ""
    raise InvalidRequest("Message content must be a string or an array.", param=where)


def _text(content: Any, where: str) -> str:
    blocks = _content(content, where)
    if isinstance(blocks, str):
        return blocks
    return "".join(b.get("text", "") for b in blocks)


def _assistant(msg: Json, where: str) -> list[Json]:
    blocks: list[Json] = []
    text = _text(msg.get("content"), f"{where}.content")
    if text:
        blocks.append({"type": "text", "text": text})
    for j, call in enumerate(msg.get("tool_calls") or ()):
        name, args = function_call(call, f"{where}.tool_calls[{j}]")
        blocks.append({"type": "tool_use", "id": call.get("id"), "name": name, "input": args})
    return blocks


def _tool_result(msg: Json, where: str) -> list[Json]:
    call_id = msg.get("tool_call_id")
    if not isinstance(call_id, str):
        raise InvalidRequest("Tool messages need a 'tool_call_id'.", param=f"{where}.tool_call_id")
    result = {"type": "tool_result", "tool_use_id": call_id}
    return [{**result, "content": _content(msg.get("content"), f"{where}.content")}]


def _as_blocks(content: str | list[Json]) -> list[Json]:
    if isinstance(content, list):
        return content
    return [{"type": "text", "text": content}] if content else []


def _append(turns: list[Json], role: str, content: str | list[Json]) -> None:
    # Anthropic wants alternating turns; parallel tool results share one user turn.
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"] = _as_blocks(turns[-1]["content"]) + _as_blocks(content)
    else:
        turns.append({"role": role, "content": content})


def split_messages(messages: list[Any]) -> tuple[list[Json], list[Json]]:
    """(system blocks, alternating user/assistant turns) from OpenAI messages."""
    system: list[Json] = []
    turns: list[Json] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        role = msg.get("role")
        if role in _SYSTEM_ROLES:
            system.extend(_as_blocks(_content(msg.get("content"), f"{where}.content")))
        elif role == "user":
            _append(turns, "user", _content(msg.get("content"), f"{where}.content"))
        elif role == "assistant":
            blocks = _assistant(msg, where)
            if blocks:
                _append(turns, "assistant", blocks)
        elif role == "tool":
            _append(turns, "user", _tool_result(msg, where))
        else:
            raise InvalidRequest(f"Role {role!r} is not supported.", param=f"{where}.role")
    return system, turns


def _tool(tool: Any, where: str) -> Json:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or tool.get("type") != "function" or "name" not in fn:
        raise InvalidRequest("Only function tools are supported.", param=where)
    out: Json = {"name": fn["name"]}
    if fn.get("description"):
        out["description"] = fn["description"]
    out["input_schema"] = fn.get("parameters") or {"type": "object", "properties": {}}
    return out


def _tool_choice(choice: Any, parallel: Any) -> Json | None:
    if choice in (None, "auto"):
        out: Json | None = {"type": "auto"} if choice or parallel is False else None
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        return {"type": "none"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out = {"type": "tool", "name": choice["function"].get("name")}
    else:
        raise InvalidRequest("Unsupported 'tool_choice'.", param="tool_choice")
    if out is not None and parallel is False:
        out["disable_parallel_tool_use"] = True
    return out


def _sampling(body: Json, out: Json) -> None:
    for key in ("temperature", "top_p", "top_k"):
        if body.get(key) is not None:
            out[key] = body[key]
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = stop
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    if isinstance(body.get("n"), int) and body["n"] > 1:
        raise InvalidRequest("Anthropic returns one choice per request; 'n' must be 1.", param="n")


def _response_format(body: Json, out: Json, system: list[Json]) -> None:
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        system.append({"type": "text", "text": JSON_OBJECT_HINT})
    elif kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest("'json_schema.schema' must be an object.", param="response_format")
        out["output_config"] = {"format": {"type": "json_schema", "schema": schema}}


def to_anthropic(
    body: Json, endpoint: str, model: str, stream: bool, default_max_tokens: int
) -> Json:
    """An OpenAI chat (or legacy completions) body as an Anthropic Messages body."""
    system, turns = split_messages(chat_messages(body, endpoint))
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    out: Json = {"model": model, "messages": turns, "max_tokens": max_tokens or default_max_tokens}
    _sampling(body, out)
    if endpoint == "chat":
        tools = body.get("tools")
        if tools:
            out["tools"] = [_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]
            choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
            if choice is not None:
                out["tool_choice"] = choice
        _response_format(body, out, system)
    if system:
        out["system"] = system
    if stream:
        out["stream"] = True
    return out


# -- response -----------------------------------------------------------------


def usage_json(usage: Any) -> Json | None:
    """Anthropic usage as OpenAI's ``usage`` object (see the module docstring)."""
    if not isinstance(usage, dict):
        return None
    read = positive_int(usage.get("cache_read_input_tokens"))
    write = positive_int(usage.get("cache_creation_input_tokens"))
    prompt = positive_int(usage.get("input_tokens")) + read + write
    completion = positive_int(usage.get("output_tokens"))
    out: Json = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if read or write:
        out["prompt_tokens_details"] = {"cached_tokens": read, "cache_write_tokens": write}
    return out


def _tool_call(block: Json) -> Json:
    args = orjson.dumps(block.get("input") or {}).decode()
    fn = {"name": block.get("name"), "arguments": args}
    return {"id": block.get("id"), "type": "function", "function": fn}


def finish_reason(stop_reason: Any, endpoint: str) -> str:
    reason = FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"
    return "stop" if endpoint == "completions" and reason == "tool_calls" else reason


def from_anthropic(msg: Json, *, chat_id: str, created: int, model: str, endpoint: str) -> Json:
    """An Anthropic Message as OpenAI's ``chat.completion`` / ``text_completion``."""
    blocks = [b for b in msg.get("content") or () if isinstance(b, dict)]
    text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
    calls = [_tool_call(b) for b in blocks if b.get("type") == "tool_use"]
    finish = finish_reason(msg.get("stop_reason"), endpoint)
    out: Json = {"id": chat_id, "created": created, "model": msg.get("model") or model}
    if endpoint == "completions":
        out["object"] = "text_completion"
        out["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    else:
        content = text or (None if calls else "")
        message: Json = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = calls
        out["object"] = "chat.completion"
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        out["choices"] = [choice]
    usage = usage_json(msg.get("usage"))
    if usage is not None:
        out["usage"] = usage
    return out
