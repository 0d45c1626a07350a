"""A Responses API request as the chat completion the pipeline runs.

Only what has a chat equivalent is accepted; a Responses feature the
gateway cannot honour on every provider (built-in tools such as web search,
background mode, stored item references) is refused with a 400 naming it
rather than silently dropped, since a client would otherwise get an answer
to a different question than it asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.core.errors import InvalidRequest

Json = dict[str, Any]

# Responses sampling fields that mean the same in chat.
_SAME = ("temperature", "top_p", "parallel_tool_calls", "user", "top_logprobs", "seed")
_REFUSED = ("background", "conversation", "prompt")


@dataclass(slots=True)
class Asked:
    """What the client asked for that the chat body does not carry but the
    Response object echoes back (and a stored response keeps)."""

    model: str
    instructions: str | None = None
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    tools: list[Json] = field(default_factory=list)
    tool_choice: Any = "auto"
    text: Json = field(default_factory=lambda: {"format": {"type": "text"}})
    reasoning: Json | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    parallel_tool_calls: bool = True
    user: str | None = None


def asked(body: Json) -> Asked:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string.", param="model")
    out = Asked(model)
    out.instructions = _optional(body, "instructions", str)
    store = body.get("store", True)
    out.store = store is not False
    out.previous_response_id = _optional(body, "previous_response_id", str)
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise InvalidRequest("'metadata' must map strings to strings.", param="metadata")
        out.metadata = metadata
    out.tools = body.get("tools") or []
    if not isinstance(out.tools, list):
        raise InvalidRequest("'tools' must be an array.", param="tools")
    out.tool_choice = body.get("tool_choice", "auto")
    if isinstance(body.get("text"), dict) and isinstance(body["text"].get("format"), dict):
        out.text = {"format": body["text"]["format"]}
    out.reasoning = _optional(body, "reasoning", dict)
    out.max_output_tokens = _optional(body, "max_output_tokens", int)
    out.temperature = _optional(body, "temperature", (int, float))
    out.top_p = _optional(body, "top_p", (int, float))
    out.parallel_tool_calls = body.get("parallel_tool_calls") is not False
    out.user = _optional(body, "user", str)
    return out


def _optional(body: Json, name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise InvalidRequest(f"'{name}' has the wrong type.", param=name)
    return value


def to_chat(body: Json, ask: Asked) -> Json:
    """The chat completions body for ``body`` (history from a previous
    response is prepended later, once the caller is known)."""
    for name in _REFUSED:
        if body.get(name):
            raise InvalidRequest(f"'{name}' is not supported by this gateway.", param=name)
    chat: Json = {"model": ask.model, "messages": system(ask) + messages(body.get("input"))}
    for name in _SAME:
        if body.get(name) is not None:
            chat[name] = body[name]
    if ask.max_output_tokens is not None:
        chat["max_completion_tokens"] = ask.max_output_tokens
    if ask.tools:
        chat["tools"] = [_tool(t) for t in ask.tools]
    if "tool_choice" in body:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    fmt = _response_format(ask.text["format"])
    if fmt is not None:
        chat["response_format"] = fmt
    effort = (ask.reasoning or {}).get("effort")
    if isinstance(effort, str):
        chat["reasoning_effort"] = effort
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # response.completed carries usage
    return chat


def system(ask: Asked) -> list[Json]:
    return [{"role": "system", "content": ask.instructions}] if ask.instructions else []


def messages(given: Any) -> list[Json]:
    """``input`` (a string, or a list of items) as chat messages."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        raise InvalidRequest("'input' must be a string or a non-empty array.", param="input")
    out: list[Json] = []
    for n, item in enumerate(given):
        if not isinstance(item, dict):
            raise InvalidRequest(f"input[{n}] must be an object.", param="input")
        kind = item.get("type", "message")
        if kind == "message":
            out.append(_message(item, n))
        elif kind == "function_call":
            _function_call(out, item, n)
        elif kind == "function_call_output":
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": _string(item, "call_id", n),
                    "content": _output_text(item.get("output"), n),
                }
            )
        elif kind == "reasoning":
            continue  # a previous turn's reasoning: no chat equivalent, and not needed
        else:
            raise InvalidRequest(
                f"input[{n}]: items of type '{kind}' are not supported by this gateway.",
                param="input",
            )
    return out


def _string(item: Json, name: str, n: int) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise InvalidRequest(f"input[{n}].{name} must be a string.", param="input")
    return value


def _message(item: Json, n: int) -> Json:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise InvalidRequest(f"input[{n}].role is not a message role.", param="input")
    role = "system" if role == "developer" else role
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise InvalidRequest(f"input[{n}].content must be a string or an array.", param="input")
    parts = [_part(p, n) for p in content]
    if role != "user":  # only a user turn may carry images: the others as plain text
        return {"role": role, "content": "".join(p.get("text", "") for p in parts)}
    return {"role": role, "content": parts}


def _part(part: Any, n: int) -> Json:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text"):
        return {"type": "text", "text": str(part.get("text", ""))}
    if kind == "refusal":
        return {"type": "text", "text": str(part.get("refusal", ""))}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):
            raise InvalidRequest(
                f"input[{n}]: an input_image needs an image_url (file ids are not supported).",
                param="input",
            )
        image: Json = {"url": url}
        if part.get("detail") in ("low", "high", "auto"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file" and isinstance(part.get("file_data"), str):
        file = {"file_data": part["file_data"], "filename": part.get("filename") or "file"}
        return {"type": "file", "file": file}
    raise InvalidRequest(f"input[{n}]: content of type '{kind}' is not supported.", param="input")


def _function_call(out: list[Json], item: Json, n: int) -> None:
    """Consecutive function calls are one assistant turn with several tool calls."""
    call = {
        "id": _string(item, "call_id", n),
        "type": "function",
        "function": {"name": _string(item, "name", n), "arguments": item.get("arguments") or ""},
    }
    last = out[-1] if out else None
    if last is not None and last["role"] == "assistant" and "tool_calls" in last:
        last["tool_calls"].append(call)
    elif last is not None and last["role"] == "assistant" and isinstance(last["content"], str):
        last["tool_calls"] = [call]
    else:
        out.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _output_text(output: Any, n: int) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return "".join(str(p.get("text", "")) for p in output if isinstance(p, dict))
    raise InvalidRequest(f"input[{n}].output must be a string or an array.", param="input")


def _tool(tool: Any) -> Json:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise InvalidRequest(
            f"Tools of type '{kind}' are not supported by this gateway; only function tools.",
            param="tools",
        )
    name = tool.get("name")
    if not isinstance(name, str):
        raise InvalidRequest("A function tool needs a 'name'.", param="tools")
    function: Json = {"name": name, "parameters": tool.get("parameters") or {"type": "object"}}
    if tool.get("description") is not None:
        function["description"] = tool["description"]
    if tool.get("strict") is not None:
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise InvalidRequest(
        "This 'tool_choice' is not supported by this gateway.", param="tool_choice"
    )


def _response_format(fmt: Json) -> Json | None:
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise InvalidRequest(f"text.format of type '{kind}' is not supported.", param="text")
