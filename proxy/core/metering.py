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
from proxy.core.sse import DONE, event_data, split_events
from proxy.core.usage import Usage, usage_from_openai

_USAGE_MARKERS = (b'"usage":{', b'"usage": {')
_FINISH_MARKERS = (b'"finish_reason":"', b'"finish_reason": "')  # a string, not null
# What makes a read worth looking at event by event; any other read is
# forwarded and kept as it came.
_MARKERS = (*_USAGE_MARKERS, *_FINISH_MARKERS, b"[DONE]")


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
        "_envelope",
        "_finished",
        "_kept",
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
        # The forwarded events, as they were forwarded (whole reads mostly):
        # their payloads are taken out only when someone asks (``payloads``).
        # Kept for the whole stream (an estimate, the cache and the journal
        # may need the text), so kept small: a read that begins with the
        # envelope every chunk of this stream repeats (``data: {"id": ...,
        # "model": ..., `` up to ``"choices"``, learnt from the first) is kept
        # without it, which is then the only kind of entry that begins with
        # a quote; about half of a typical chunk's bytes.
        self._kept: list[bytes] = []
        self._envelope: bytes | None = None

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
        self._keep(event if event.endswith(b"\n\n") else event + b"\n\n")
        return event

    def _keep(self, events: bytes) -> None:
        envelope = self._envelope
        if envelope is None and events.startswith(b"data: {"):
            at = events.find(b'"choices"')
            envelope = self._envelope = events[:at] if 0 < at < events.find(b"\n") else b"data: {"
        if (
            envelope is not None
            and events.startswith(envelope)
            and events.startswith(b'"', len(envelope))
        ):
            self._kept.append(events[len(envelope) :])  # begins with a quote
        elif events.startswith(b'"'):  # not SSE a client could use; kept apart from the above
            self._kept.append(b"\n" + events)
        else:
            self._kept.append(events)

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

    def observe_read(self, events: bytes) -> bytes:
        """``observe_batch`` on the whole events of one upstream read, given
        as one bytes (``sse.EventSplitter``). Only the events from the first
        that may carry usage, a finish reason or ``[DONE]`` on are looked at
        one by one; those before it are forwarded and kept as they came
        (a substring scan: on a stream, usually the whole read)."""
        if (
            b'"usage":{' not in events
            and b'"finish_reason":"' not in events
            and b"[DONE]" not in events
            and b'"usage": {' not in events
            and b'"finish_reason": "' not in events
        ):  # the usual read (``_MARKERS``, spelt out: no loop, no calls)
            self._keep(events)
            return events
        first = -1
        for marker in _MARKERS:
            at = events.find(marker)
            if at >= 0 and (first < 0 or at < first):
                first = at
        if first < 0:
            self._keep(events)
            return events
        start = events.rfind(b"\n\n", 0, first) + 2  # after the event before it (1: none)
        if start < 2:
            return self.observe_batch(split_events(events))
        head = events[:start]
        self._keep(head)
        return head + self.observe_batch(split_events(events[start:]))

    @property
    def payloads(self) -> list[bytes]:
        """The ``data:`` payloads forwarded so far, in order (not ``[DONE]``).
        Computed on each call (a thread may ask while the loop appends)."""
        out = []
        envelope = self._envelope or b""
        for kept in self._kept:
            if kept.startswith(b'"'):
                kept = envelope + kept
            if kept.startswith(b"data: ") and kept.find(b"\n") == len(kept) - 2:
                out.append(kept[6:-2])  # one event of one data line: the usual case
                continue
            for event in split_events(kept):
                data = event_data(event)
                if data is not None and data != b"[DONE]":
                    out.append(data)
        return out

    def delivered_text(self) -> str:
        return self.text_of(self.payloads)

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
