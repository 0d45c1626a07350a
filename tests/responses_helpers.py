"""Reading and checking Responses API streams in tests."""

from __future__ import annotations

from typing import Any

import orjson

from tests.schema import validate

# Each event type and its own schema in OpenAI's spec (ResponseStreamEvent is
# their anyOf, which any one of them satisfies: the specific one is stricter).
EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
    "error": "ResponseErrorEvent",
}


def parse_events(raw: bytes) -> list[dict[str, Any]]:
    """Every ``event:``/``data:`` pair; the event line must name the data's type."""
    out = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(b": ", 1) for line in block.split(b"\n"))
        event = orjson.loads(lines[b"data"])
        assert lines[b"event"].decode() == event["type"]
        out.append(event)
    return out


def check_events(events: list[dict[str, Any]]) -> None:
    """Valid against the spec, numbered 0, 1, 2, … and the Response inside valid too."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for event in events:
        validate(event, "ResponseStreamEvent")
        validate(event, EVENT_SCHEMAS[event["type"]])
        if "response" in event:
            validate(event["response"], "Response")
