"""The side counter of the relay: usage for every request, whatever happened.

Provider-reported usage wins. When the provider reported nothing, reported
only zeros for a non-empty answer, or the stream was cut before its usage
chunk, the tokens are counted with tiktoken on the text actually delivered
(one call on the collected text, never per chunk) and marked ``estimated``.
Such a count is proportional to the text (~0.1 us per byte), so the request
path runs it in a thread (``settled_usage``), not on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import orjson

from proxy.core import tokens
from proxy.core.errors import GatewayError
from proxy.core.sse import DONE, event_data
from proxy.core.usage import Usage, usage_from_openai

_USAGE_MARKERS = (b'"usage":{', b'"usage": {')
_FINISH_MARKERS = (b'"finish_reason":"', b'"finish_reason": "')  # a string, not null


def _choice_text(choice: dict[str, Any]) -> str:
    """Text a choice carries, in a delta (stream) or a message (non-stream)."""
    parts: list[str] = []
    text = choice.get("text")
    if isinstance(text, str):
        parts.append(text)
    for key in ("delta", "message"):
        msg = choice.get(key)
        if not isinstance(msg, dict):
            continue
        for field in ("content", "reasoning_content", "refusal"):
            value = msg.get(field)
            if isinstance(value, str):
                parts.append(value)
        for call in msg.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                parts.extend(str(fn.get(k) or "") for k in ("name", "arguments"))
    return "".join(parts)


def _text_of(obj: Any) -> str:
    if not isinstance(obj, dict):
        return ""
    return "".join(_choice_text(c) for c in obj.get("choices") or () if isinstance(c, dict))


def _trusted(usage: Usage | None, delivered_text: bool) -> bool:
    # All-zero usage for an answer that had text means "unknown", not "free".
    return usage is not None and (usage.total_tokens > 0 or not delivered_text)


class StreamMeter:
    """Watches each OpenAI SSE event on its way to the client.

    ``observe`` returns the bytes to forward, or None to drop the event: the
    usage chunk Tollway asked for on the client's behalf is dropped when the
    client did not ask for usage itself. Only events that carry usage or a
    finish reason are decoded; the others pass as bytes.
    """

    __slots__ = (
        "_finished",
        "_payloads",
        "choices",
        "client_wants_usage",
        "done",
        "failure",
        "usage",
    )

    def __init__(self, client_wants_usage: bool, choices: int = 1) -> None:
        self.client_wants_usage = client_wants_usage
        self.choices = choices  # the request's ``n``
        self.usage: Usage | None = None
        self.done = False
        # An answer that ended in its API's own failure event (a passed-through
        # Responses stream's ``response.failed``): recorded as this error.
        self.failure: GatewayError | None = None
        self._finished: set[object] = set()  # indexes of choices with a finish reason
        self._payloads: list[bytes] = []

    def observe(self, event: bytes) -> bytes | None:
        data = event_data(event)
        if data is None:
            return event  # comment / heartbeat: passes through
        if data == b"[DONE]":
            self.done = True
            return event
        has_usage = _USAGE_MARKERS[0] in data or _USAGE_MARKERS[1] in data
        if has_usage or _FINISH_MARKERS[0] in data or _FINISH_MARKERS[1] in data:
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                self._note_finish(obj)
                found = usage_from_openai(obj.get("usage")) if has_usage else None
                if found is not None:
                    self.usage = found
                if has_usage and not self.client_wants_usage and not obj.get("choices"):
                    return None
        self._payloads.append(data)
        return event

    def _note_finish(self, obj: dict[str, Any]) -> None:
        for choice in obj.get("choices") or ():
            if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str):
                self._finished.add(choice.get("index", 0))

    def complete(self) -> bool:
        """Whether the whole answer arrived, ``[DONE]`` or not: every choice
        has its finish reason, and the usage chunk came if the client asked."""
        return len(self._finished) >= self.choices and (
            self.usage is not None or not self.client_wants_usage
        )

    def end(self) -> bytes:
        """The ``[DONE]`` a provider left out of a complete answer."""
        self.done = True
        return DONE

    def observe_batch(self, events: list[bytes]) -> bytes:
        """``observe`` on each event of one upstream read, in order; the
        bytes to forward for all of them at once (empty: nothing to send)."""
        if len(events) == 1:
            return self.observe(events[0]) or b""
        return b"".join([out for event in events if (out := self.observe(event)) is not None])

    @property
    def payloads(self) -> list[bytes]:
        """The ``data:`` payloads forwarded so far, in order (not ``[DONE]``)."""
        return self._payloads

    def delivered_text(self) -> str:
        return self.text_of(self._payloads)

    def text_of(self, payloads: list[bytes]) -> str:
        """The answer text these ``payloads`` (some of ``payloads``) carry."""
        return text_of_payloads(payloads)

    def reported(self) -> Usage | None:
        """The provider's usage when it can be trusted without counting
        (a positive total): the common case, decided without the text."""
        if self.usage is not None and self.usage.total_tokens > 0:
            return self.usage
        return None

    def result(self, body: dict[str, Any], endpoint: str, model: str) -> Usage:
        if self.usage is not None and self.usage.total_tokens > 0:
            return self.usage
        text = self.delivered_text()
        if _trusted(self.usage, bool(text)):
            assert self.usage is not None
            return self.usage
        return estimate(body, endpoint, model, text)


def text_of_payloads(payloads: list[bytes]) -> str:
    """The answer text carried by these SSE ``data:`` payloads."""
    parts = []
    for data in payloads:
        try:
            parts.append(_text_of(orjson.loads(data)))
        except orjson.JSONDecodeError:
            continue
    return "".join(parts)


def estimate(body: dict[str, Any], endpoint: str, model: str, completion_text: str) -> Usage:
    return Usage(
        prompt_tokens=tokens.count_prompt(body, endpoint, model),
        completion_tokens=tokens.count_text(completion_text, model),
        source="estimated",
    )


def reply_usage(
    reported: Usage | None, response: Any, body: dict[str, Any], endpoint: str, model: str
) -> Usage:
    """Usage of a non-stream reply: the provider's, else a tiktoken estimate."""
    text = _text_of(response)
    if _trusted(reported, bool(text)):
        assert reported is not None
        return reported
    return estimate(body, endpoint, model, text)


_T = TypeVar("_T")


async def off_loop(fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` in the default thread pool. Settling must not be lost:
    if this task is cancelled while it waits, the work is finished here (the
    count is bounded by the answer's size) and the cancellation is requested
    again, so it still ends the task at its next await (or when it returns)."""
    fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None:
            task.cancel()
        return fn(*args)


async def settled_usage(
    meter: StreamMeter, body: dict[str, Any], endpoint: str, model: str
) -> Usage:
    """A stream's usage at settle: the provider's, else counted off the loop."""
    reported = meter.reported()
    if reported is not None:
        return reported
    return await off_loop(meter.result, body, endpoint, model)
