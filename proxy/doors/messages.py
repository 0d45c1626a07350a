"""Anthropic's Messages API (``POST /v1/messages``) as a front door.

The request becomes a chat completion (``messages_request``); the answer
comes back as an Anthropic ``Message`` (``messages_object``) or, streamed,
as Anthropic's event sequence (``messages_stream``); errors take
Anthropic's shape and statuses (``messages_errors``). Anthropic's SDK sends
``x-api-key`` (the gate takes it as the bearer) and ``anthropic-version``
(accepted, whatever its value: the answer's shape is the one every version
since 2023-06-01 reads).

Passed through: an attempt to an Anthropic provider sends the client's own
body (``native_body``: model and capped ``max_tokens`` rewritten) and the
client gets Anthropic's answer as it was sent, unless a stage changed the
request or needs the answer in chat (``Exchange.passthrough``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import orjson

from proxy.core.errors import GatewayError
from proxy.core.metering import StreamMeter
from proxy.doors import messages_errors, messages_request
from proxy.doors.base import DoorServices, FrontDoor
from proxy.doors.messages_object import message
from proxy.doors.messages_stream import MessagesStream
from proxy.doors.messages_stream import event as event  # re-exported: bench builds events with it
from proxy.doors.native import NativeMeter
from proxy.providers.anthropic import native_usage

Json = dict[str, Any]


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
        return messages_request.to_chat(body)

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
        return messages_errors.error_event(exc)

    def reply(self, body: bytes) -> bytes:
        chat = orjson.loads(body)
        return orjson.dumps(message(chat if isinstance(chat, dict) else {}, self.message_id))

    def stream(self) -> MessagesStream:
        return MessagesStream(self.message_id)

    @classmethod
    def error(cls, exc: GatewayError) -> tuple[int, bytes]:
        return messages_errors.error(exc)
