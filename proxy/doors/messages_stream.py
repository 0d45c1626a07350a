"""A chat SSE answer as Anthropic's Messages event sequence.

A stream's usage comes from the chat usage chunk (``to_chat`` asks for
it), so ``message_start`` carries zeros and ``message_delta`` the real
counts, ``input_tokens`` included.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.core.errors import GatewayError
from proxy.core.sse import event_data
from proxy.doors.messages_errors import error_event
from proxy.doors.messages_object import stop_reason, usage

Json = dict[str, Any]


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
        return error_event(exc)

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
