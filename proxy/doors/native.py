"""A door's answer passed through from a provider that speaks its API.

The events go to the client as the provider sent them (``PassThrough``);
``NativeMeter`` watches them on the side as ``StreamMeter`` watches chat
events, so billing is the same: the provider's usage when the stream ends,
and when it is cut (or the client leaves) the prompt as the provider
reported it at the start, if it did, plus the delivered text counted.

Each door says what its events mean: which carry usage or end the answer
(``read``), which carry answer text (``text``), and which bytes mark the
events worth decoding (``MARKERS``): the others pass without being parsed.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import orjson

from proxy.core import tokens
from proxy.core.errors import GatewayError
from proxy.core.metering import StreamMeter
from proxy.core.sse import event_data, split_events
from proxy.core.usage import Usage

Json = dict[str, Any]


class NativeMeter(StreamMeter):
    MARKERS: ClassVar[tuple[bytes, ...]]

    def __init__(self) -> None:
        super().__init__(client_wants_usage=True)

    def observe_read(self, events: bytes) -> bytes:
        """Every event looked at: which ones end the answer is the API's own
        (``MARKERS``), not chat's."""
        return self.observe_batch(split_events(events))

    def observe(self, event: bytes) -> bytes | None:
        data = event_data(event)
        if data is None:
            return event  # a comment
        self._keep(event if event.endswith(b"\n\n") else event + b"\n\n")
        if any(marker in data for marker in self.MARKERS):
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                self.read(obj)
        return event

    @abstractmethod
    def read(self, obj: Json) -> None:
        """An event with a marker: note its usage; ``done`` at the last one."""

    @abstractmethod
    def text(self, obj: Json) -> str:
        """The answer text an event carries ("" for most)."""

    def complete(self) -> bool:
        return self.done

    def end(self) -> bytes:
        return b""  # the API has no [DONE]: its last event came or it did not

    def reported(self) -> Usage | None:
        if self.done and self.usage is not None and self.usage.total_tokens > 0:
            return self.usage
        return None

    def result(self, body: dict[str, Any], endpoint: str, model: str) -> Usage:
        reported = self.reported()
        if reported is not None:
            return reported
        # Cut short: the prompt as reported at the start (cache split kept),
        # the completion counted on what the client was sent.
        known = self.usage
        prompt = known.prompt_tokens if known is not None else 0
        if not prompt:
            prompt = tokens.count_prompt(body, endpoint, model)
        details = {k: v for k, v in (known.details if known else {}).items() if "cache" in k}
        completion = tokens.count_text(self.delivered_text(), model)
        return Usage(prompt, completion, "estimated", details)

    def text_of(self, payloads: list[bytes]) -> str:
        parts = []
        for data in payloads:
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                parts.append(self.text(obj))
        return "".join(parts)


class PassThrough:
    """The provider's events to the client unchanged (``DoorStream``); a
    failure after the headers is the API's own error event, ``error`` given
    how many events the client had (Responses numbers its events)."""

    def __init__(self, error: Callable[[GatewayError, int], bytes]) -> None:
        self._error = error
        self._events = 0

    def feed(self, data: bytes) -> bytes:
        self._events += data.count(b"\n\n")
        return data

    def fail(self, exc: GatewayError) -> bytes:
        return self._error(exc, self._events)
