"""The Responses door's translators on their own: the request to chat, and
the stream translator cut at every byte (the same events, whatever the cut)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.core.errors import InvalidRequest, UpstreamStreamBroken
from proxy.core.sse import DONE
from proxy.doors import responses_object as obj
from proxy.doors.responses import ResponsesDoor
from proxy.doors.responses_request import asked, to_chat
from proxy.doors.responses_stream import ResponsesStream
from tests.responses_helpers import check_events, parse_events


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    body = {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": choices}
    return b"data: " + orjson.dumps({**body, **extra}) + b"\n\n"


def call(index: int, args: str, call_id: str | None = None, name: str | None = None) -> Any:
    fn: dict[str, Any] = {"arguments": args}
    if name:
        fn["name"] = name
    out: dict[str, Any] = {"index": index, "function": fn}
    if call_id:
        out.update(id=call_id, type="function")
    return {"tool_calls": [out]}


CHAT_STREAM = b"".join(
    [
        chunk({"role": "assistant", "content": ""}),
        b": keep-alive\n\n",
        chunk({"content": "Let me "}),
        chunk({"content": "check \u00e9t\u00e9 \U0001f600."}),
        chunk(call(0, "", "call_a", "get_weather")),
        chunk(call(0, '{"location":')),
        chunk(call(0, ' "Paris"}')),
        chunk(call(1, '{"tz": "CET"}', "call_b", "get_time")),
        chunk({}, "tool_calls"),
        chunk(None, usage={"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}),
        DONE,
    ]
)


def translator() -> ResponsesStream:
    ask = asked({"model": "m", "input": "hi"})
    return ResponsesStream(
        obj.Ids("fixed", created_at=1, clock=lambda: 2.0), ask, lambda final: None
    )


def whole() -> list[dict[str, Any]]:
    return parse_events(translator().feed(CHAT_STREAM))


def test_stream_events_are_valid_and_complete() -> None:
    events = whole()
    check_events(events)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds.count("response.output_item.added") == 3  # a message, two calls
    assert kinds.count("response.output_item.done") == 3
    assert kinds.count("response.function_call_arguments.done") == 2
    final = events[-1]
    assert final["type"] == "response.completed"
    out = final["response"]["output"]
    assert out[0]["content"][0]["text"] == "Let me check \u00e9t\u00e9 \U0001f600."
    assert [(i["call_id"], i["arguments"]) for i in out[1:]] == [
        ("call_a", '{"location": "Paris"}'),
        ("call_b", '{"tz": "CET"}'),
    ]
    assert final["response"]["usage"]["total_tokens"] == 16


@pytest.mark.parametrize("crlf", [False, True])
def test_split_at_every_byte_gives_the_same_events(crlf: bool) -> None:
    data = CHAT_STREAM.replace(b"\n", b"\r\n") if crlf else CHAT_STREAM
    expected = whole()
    for cut in range(len(data) + 1):
        t = translator()
        events = parse_events(t.feed(data[:cut]) + t.feed(data[cut:]))
        assert events == expected, f"cut at byte {cut}"
    t = translator()
    assert parse_events(b"".join(t.feed(data[i : i + 1]) for i in range(len(data)))) == expected


def test_length_finish_is_incomplete_and_failure_is_failed() -> None:
    t = translator()
    done = parse_events(t.feed(chunk({"content": "a"}) + chunk({}, "length") + DONE))
    check_events(done)
    assert done[-1]["type"] == "response.incomplete"
    assert done[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    t = translator()
    broke = parse_events(
        t.feed(chunk({"content": "a"})) + t.fail(UpstreamStreamBroken("provider went away"))
    )
    check_events(broke)
    assert broke[-1]["type"] == "response.failed"
    assert broke[-1]["response"]["error"]["code"] == "server_error"
    early = parse_events(translator().fail(UpstreamStreamBroken("gone")))
    check_events(early)
    assert [e["type"] for e in early] == ["error"]


def test_request_translation() -> None:
    door = ResponsesDoor("req_1")
    chat = door.to_chat(
        {
            "model": "m",
            "instructions": "sys",
            "input": [
                {"role": "developer", "content": "dev"},
                {"role": "user", "content": [{"type": "input_text", "text": "q"}]},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "one"},
                {"type": "function_call_output", "call_id": "c2", "output": "two"},
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "ok"}],
                },
            ],
            "text": {"format": {"type": "json_object"}},
            "stream": True,
        }
    )
    assert chat["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "system", "content": "dev"},
        {"role": "user", "content": [{"type": "text", "text": "q"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
        {"role": "assistant", "content": "ok"},
    ]
    assert chat["response_format"] == {"type": "json_object"}
    assert chat["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    "body",
    [
        {"input": "hi"},
        {"model": "m", "input": []},
        {"model": "m", "input": "hi", "tools": [{"type": "file_search"}]},
        {"model": "m", "input": [{"type": "item_reference", "id": "x"}]},
        {"model": "m", "input": "hi", "background": True},
    ],
)
def test_what_cannot_be_honoured_is_refused(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        to_chat(body, asked(body))
