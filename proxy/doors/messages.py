"""Anthropic's Messages API (``POST /v1/messages``) as a front door.

The request becomes a chat completion (``to_chat``), the chat answer becomes
an Anthropic ``Message`` (``reply``) or Anthropic's event sequence
(``MessagesStream``), errors take Anthropic's shape and statuses (``error``).
Anthropic's SDK sends ``x-api-key`` (the gate takes it as the bearer) and
``anthropic-version`` (accepted, whatever its value: the answer's shape is
the one every version since 2023-06-01 reads).

What chat cannot carry, and so is lost on the way to a non-Anthropic
provider: ``top_k``, ``thinking`` (and thinking blocks in the history),
server tools, documents, images inside a ``tool_result``; on the way back,
thinking blocks, citations and which stop sequence matched. An attempt to
an Anthropic provider passes the request through instead (``native_body``:
the client's body, model and capped ``max_tokens`` rewritten) and the
client gets Anthropic's answer as it was sent, unless a stage changed the
request or needs the answer in chat (``Exchange.passthrough``).

Usage: chat's ``prompt_tokens`` includes cached tokens, Anthropic's
``input_tokens`` excludes them; the split in ``prompt_tokens_details``
(``cached_tokens``, ``cache_write_tokens``) is given back as
``cache_read_input_tokens`` / ``cache_creation_input_tokens``. A stream's
figures come from the chat usage chunk (``to_chat`` asks for it), so
``message_start`` carries zeros and ``message_delta`` the real counts,
``input_tokens`` included.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import orjson

from proxy.core import tokens
from proxy.core.errors import GatewayError, InvalidRequest
from proxy.core.metering import StreamMeter
from proxy.core.sse import event_data
from proxy.doors.base import DoorServices, FrontDoor
from proxy.doors.native import NativeMeter
from proxy.providers.anthropic import native_usage
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
# Anthropic tool_choice type -> chat tool_choice
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def _invalid(message: str, param: str | None = None) -> InvalidRequest:
    return InvalidRequest(message, param=param)


# -- request: Anthropic -> chat ------------------------------------------------


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


# -- answer: chat -> Anthropic -------------------------------------------------


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


def event(kind: str, obj: Json) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **obj}) + b"\n\n"


PING = event("ping", {})


class MessagesStream:
    """Chat SSE bytes in (in any pieces: an event cut at the end waits for
    the rest), Anthropic's events out: ``message_start`` and a ``ping`` on
    the first chunk, a ``content_block_start``/``_delta``/``_stop`` run per
    text or tool_use block, ``message_delta`` (stop reason, usage) and
    ``message_stop`` on ``[DONE]``. A heartbeat comment becomes a ``ping``."""

    def __init__(self, message_id: str) -> None:
        self.message_id = message_id
        self._buf = b""
        self._started = False
        self._block = -1  # index of the last block opened
        self._next = 0  # index of the next block to open
        self._kind = ""  # "text" or "tool_use": the open block's
        self._tools: dict[Any, int] = {}  # chat tool_calls index -> block index
        self._finish: Any = None
        self._usage: Any = None
        self._ended = False

    def feed(self, data: bytes) -> bytes:
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        start = 0
        while (end := buf.find(b"\n\n", start)) >= 0:
            self._event(buf[start : end + 2], out)
            start = end + 2
        self._buf = buf[start:]
        return b"".join(out)

    def fail(self, exc: GatewayError) -> bytes:
        _, body = MessagesDoor.error(exc)
        return b"event: error\ndata: " + body + b"\n\n"

    def _event(self, raw: bytes, out: list[bytes]) -> None:
        if self._ended or not raw.strip():
            return
        data = event_data(raw)
        if data is None:
            if self._started:
                out.append(PING)
            return
        if data == b"[DONE]":
            self._end(out)
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(chunk, dict):
            return
        if not self._started:
            self._start(chunk, out)
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._choice(choice, out)

    def _start(self, chunk: Json, out: list[bytes]) -> None:
        self._started = True
        msg: Json = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": chunk.get("model") or "",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        out.append(event("message_start", {"message": msg}))
        out.append(PING)

    def _choice(self, choice: Json, out: list[bytes]) -> None:
        delta = choice.get("delta") or {}
        text = delta.get("content") or delta.get("refusal")
        if isinstance(text, str) and text:
            if self._kind != "text":
                self._open(out, "text", {"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": text}))
        for call in delta.get("tool_calls") or ():
            self._tool_call(call, out)
        if choice.get("finish_reason"):
            self._finish = choice["finish_reason"]
            self._close(out)

    def _tool_call(self, call: Json, out: list[bytes]) -> None:
        key = call.get("index", 0)
        fn = call.get("function") or {}
        block = self._tools.get(key)
        if block is None:
            ids = {"id": call.get("id") or "", "name": fn.get("name") or ""}
            self._open(out, "tool_use", {"type": "tool_use", **ids, "input": {}})
            block = self._tools[key] = self._block
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            delta = {"type": "input_json_delta", "partial_json": args}
            out.append(event("content_block_delta", {"index": block, "delta": delta}))

    def _open(self, out: list[bytes], kind: str, block: Json) -> None:
        self._close(out)
        self._block, self._next = self._next, self._next + 1
        self._kind = kind
        out.append(event("content_block_start", {"index": self._block, "content_block": block}))

    def _delta(self, delta: Json) -> bytes:
        return event("content_block_delta", {"index": self._block, "delta": delta})

    def _close(self, out: list[bytes]) -> None:
        if self._kind:
            out.append(event("content_block_stop", {"index": self._block}))
            self._kind = ""

    def _end(self, out: list[bytes]) -> None:
        if not self._started:
            self._start({}, out)
        self._close(out)
        self._ended = True
        delta = {"stop_reason": stop_reason(self._finish), "stop_sequence": None}
        out.append(event("message_delta", {"delta": delta, "usage": usage(self._usage)}))
        out.append(event("message_stop", {}))


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


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_status(status: int) -> tuple[int, str]:
    """A gateway status as Anthropic's (status, error type): 503 (a
    provider overloaded or unavailable, one busy or unconfigured in Tollway,
    a shutdown) is Anthropic's 529 ``overloaded_error``; any other 5xx but a
    504 timeout is a 500 ``api_error``; a 4xx keeps its status."""
    if status == 503:
        status = 529
    elif status >= 500 and status not in (504, 529):
        status = 500
    if status >= 500:
        return status, _ERROR_TYPES.get(status, "api_error")
    return status, _ERROR_TYPES.get(status, "invalid_request_error")


class MessagesMeter(NativeMeter):
    """Anthropic's own events: usage from ``message_start`` (the input, the
    cache reads and writes) and ``message_delta`` (cumulative: replaces);
    the answer ends at ``message_stop``; text, thinking and tool input
    deltas are the delivered text."""

    MARKERS = (b'"usage"', b'"message_stop"')

    def __init__(self) -> None:
        super().__init__()
        self._raw: Json = {}

    def read(self, obj: Json) -> None:
        kind = obj.get("type")
        if kind == "message_stop":
            self.done = True
            return
        if kind == "message_start":
            msg = obj.get("message")
            found = msg.get("usage") if isinstance(msg, dict) else None
        else:
            found = obj.get("usage")
        if isinstance(found, dict):
            self._raw.update({k: v for k, v in found.items() if isinstance(v, int)})
            self.usage = native_usage(self._raw)

    def text(self, obj: Json) -> str:
        if obj.get("type") != "content_block_delta":
            return ""
        delta = obj.get("delta")
        if not isinstance(delta, dict):
            return ""
        for key in ("text", "thinking", "partial_json"):
            value = delta.get(key)
            if isinstance(value, str):
                return value
        return ""


class MessagesDoor(FrontDoor):
    name: ClassVar[str] = "messages"
    path: ClassVar[str] = "/v1/messages"

    def __init__(self, request_id: str, services: DoorServices | None = None) -> None:
        super().__init__(request_id, services)
        self.message_id = "msg_" + request_id.removeprefix("req_")

    def to_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        self.original = body
        return to_chat(body)

    def native_body(self, model: str, limit: int | None) -> dict[str, Any]:
        body = {**self.original, "model": model}
        if limit is not None:
            body["max_tokens"] = limit
        return body

    def native_meter(self) -> StreamMeter:
        return MessagesMeter()

    def native_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """The client's beta flags: features only the Messages API has, for
        Anthropic alone (a translated request has no use for them)."""
        beta = headers.get("anthropic-beta")
        return {"anthropic-beta": beta} if beta else {}

    def native_error(self, exc: GatewayError, sent: int) -> bytes:
        _, body = self.error(exc)
        return b"event: error\ndata: " + body + b"\n\n"

    def reply(self, body: bytes) -> bytes:
        chat = orjson.loads(body)
        return orjson.dumps(message(chat if isinstance(chat, dict) else {}, self.message_id))

    def stream(self) -> MessagesStream:
        return MessagesStream(self.message_id)

    @classmethod
    def error(cls, exc: GatewayError) -> tuple[int, bytes]:
        status, kind = anthropic_status(exc.http_status)
        err = {"type": kind, "message": exc.message}
        return status, orjson.dumps({"type": "error", "error": err})
