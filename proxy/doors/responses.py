"""OpenAI's Responses API (``POST /v1/responses``) as a front door.

The request becomes a chat completion (``responses_request``); the answer
comes back as a Response object (``responses_object``) or, streamed, as the
Responses event sequence (``responses_stream``). Stored responses
(``store``, OpenAI's default: on) are kept per owner in Postgres when the
gateway has one: ``previous_response_id`` continues such a conversation (its
input and output go before the new input as chat history), and
``GET /v1/responses/{id}`` returns it (``proxy.web.responses_api``).

Passed through: an attempt to a provider that serves the Responses API
itself (``kind: openai`` with ``responses``) gets the client's own body
(``native_body``: model, capped ``max_output_tokens``, and ``store: false``:
the gateway keeps stored responses, tenant-scoped, never the provider's
account that every tenant shares) and the client its answer as sent. A
request continuing a stored conversation is always translated: the
provider does not know the gateway's ids (``prepare``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson

from proxy.core import redact
from proxy.core.errors import GatewayError, NotFound, ServiceUnavailable, UpstreamStreamBroken
from proxy.core.metering import StreamMeter
from proxy.core.usage import usage_from_responses
from proxy.doors import responses_object as obj
from proxy.doors import responses_request as request
from proxy.doors.base import DoorServices, FrontDoor
from proxy.doors.native import NativeMeter
from proxy.doors.responses_stream import ResponsesStream
from proxy.stages.base import DoorStream, Exchange
from proxy.stores.pgwait import DatabaseDown

log = logging.getLogger("tollway.doors")

Json = dict[str, Any]


# The events that end a Responses stream, each carrying the whole Response.
_LAST = ("response.completed", "response.incomplete", "response.failed")


class ResponsesMeter(NativeMeter):
    """OpenAI's Responses events: the usage and the finished Response in
    the last event (``done``, given to ``finished``); every ``*.delta``
    string (output text, function arguments, reasoning) is delivered text."""

    MARKERS = tuple(f'"{kind}"'.encode() for kind in _LAST)

    def __init__(self, finished: Callable[[Json], None]) -> None:
        super().__init__()
        self._on_final = finished

    def read(self, event: Json) -> None:
        if event.get("type") not in _LAST:
            return
        self.done = True
        response = event.get("response")
        if event["type"] == "response.failed":
            self.failure = _failure(response)
        if isinstance(response, dict):
            self.usage = usage_from_responses(response.get("usage"))
            self._on_final(response)

    def text(self, event: Json) -> str:
        delta, kind = event.get("delta"), event.get("type")
        if isinstance(delta, str) and isinstance(kind, str) and kind.endswith(".delta"):
            return delta
        return ""


def _failure(response: object) -> UpstreamStreamBroken:
    """``response.failed``: the provider gave up mid-answer, recorded as a
    chat stream broken by a provider's error event is (502)."""
    error = response.get("error") if isinstance(response, dict) else None
    detail = "no error given"
    if isinstance(error, dict):
        detail = f"{error.get('code') or 'error'}: {error.get('message') or 'no message'}"
    return UpstreamStreamBroken(redact.scrub(f"the provider's response failed ({detail})"))


class ResponsesDoor(FrontDoor):
    name = "responses"
    path = "/v1/responses"

    def __init__(self, request_id: str, services: DoorServices | None = None) -> None:
        super().__init__(request_id, services)
        self.ids = obj.Ids()
        self.ask = request.Asked("")
        self.inputs: list[Json] = []  # this request's input, as chat messages
        self.history: list[Json] = []  # the stored conversation it continues
        self.final: Json | None = None  # the Response the client got, once finished

    def to_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        self.original = body
        self.ask = request.asked(body)
        chat = request.to_chat(body, self.ask)
        self.inputs = chat["messages"][len(request.system(self.ask)) :]
        return chat

    async def prepare(self, ex: Exchange) -> None:
        previous = self.ask.previous_response_id
        if previous is None:
            return
        ex.passthrough = False  # the history is the gateway's, in chat
        store = self.services.responses
        try:
            found = None if store is None else await store.get(ex.scope, previous)
        except DatabaseDown:
            raise ServiceUnavailable("Stored responses cannot be read right now.") from None
        if found is None:
            raise NotFound(
                f"Previous response with id '{previous}' not found.",
                param="previous_response_id",
            )
        self.history = orjson.loads(found.history)
        ex.body["messages"] = request.system(self.ask) + self.history + self.inputs

    def reply(self, body: bytes) -> bytes:
        self.final = obj.from_chat(body, self.ids, self.ask)
        return orjson.dumps(self.final)

    def stream(self) -> DoorStream:
        return ResponsesStream(self.ids, self.ask, self._finished)

    def _finished(self, final: Json) -> None:
        self.final = final

    def native_body(self, model: str, limit: int | None) -> dict[str, Any]:
        body = {**self.original, "model": model, "store": False}
        if limit is not None:
            body["max_output_tokens"] = limit
        return body

    def native_reply(self, body: bytes) -> bytes:
        try:
            final = orjson.loads(body)
        except orjson.JSONDecodeError:
            final = None
        if isinstance(final, dict) and isinstance(final.get("output"), list):
            self.final = final
        return body

    def native_meter(self) -> StreamMeter:
        return ResponsesMeter(self._finished)

    def native_error(self, exc: GatewayError, sent: int) -> bytes:
        """A bare ``error`` event numbered after the ones the client had."""
        fields = {"code": exc.error_code, "message": exc.message, "param": exc.param}
        event = {"type": "error", "sequence_number": sent, **fields}
        return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"

    async def finish(self, ex: Exchange) -> None:
        store = self.services.responses
        if store is None or not self.ask.store or self.final is None:
            return
        if ex.record.status != 200 or ex.record.client_disconnected:
            return
        history = [*self.history, *self.inputs, obj.as_chat_turn(self.final["output"])]
        try:
            await store.put(
                ex.scope, self.final["id"], orjson.dumps(self.final), orjson.dumps(history)
            )
        except DatabaseDown as exc:
            log.warning("response %s was not stored: %s", self.final["id"], exc)
