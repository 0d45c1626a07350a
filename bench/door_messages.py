"""The Messages front door's stream translation: CPU per event, in process.

    .venv/bin/python -m bench.door_messages

A 200-event chat answer (the long-stream benchmark's size of text delta,
then the finish, the usage chunk and ``[DONE]``), one event per upstream
read as a model's tokens come, run through what the relay does per read:
``StreamMeter.observe_batch`` alone (a chat client) and the meter followed
by ``MessagesStream.feed`` (an Anthropic client); and the same answer as
Anthropic's own events, passed through from an Anthropic provider
(``MessagesMeter.observe_batch`` then ``PassThrough.feed``). Prints the
median CPU time (process_time) per event of each over rounds of streams,
and the translation's own cost per event. In process, no sockets: the whole
gateway's CPU per event (the chat relay's figure in bench/RESULTS.md) is
several times either number.
"""

from __future__ import annotations

import statistics
import time

from proxy.core.metering import StreamMeter
from proxy.core.sse import DONE, data_event
from proxy.doors import messages as anthropic_events
from proxy.doors.messages import MessagesDoor, MessagesMeter, MessagesStream

EVENTS = 200
STREAMS = 200
ROUNDS = 5


def answer() -> list[bytes]:
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return data_event({**base, "choices": [choice]})

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": f" token{i % 10}"}) for i in range(EVENTS - 3)]
    events.append(chunk({}, "stop"))
    usage = {"prompt_tokens": 120, "completion_tokens": EVENTS, "total_tokens": 120 + EVENTS}
    events.append(data_event({**base, "choices": [], "usage": usage}))
    events.append(DONE)
    return events


def native_answer() -> list[bytes]:
    """The same answer as Anthropic sends it (what a pass-through relays)."""
    usage = {"input_tokens": 120, "output_tokens": 1}
    msg = {"id": "msg_bench", "type": "message", "role": "assistant", "model": "m", "usage": usage}
    events = [anthropic_events.event("message_start", {"message": msg})]
    events.append(
        anthropic_events.event(
            "content_block_start", {"index": 0, "content_block": {"type": "text"}}
        )
    )
    for i in range(EVENTS - 5):
        delta = {"type": "text_delta", "text": f" token{i % 10}"}
        events.append(anthropic_events.event("content_block_delta", {"index": 0, "delta": delta}))
    events.append(anthropic_events.event("content_block_stop", {"index": 0}))
    end = {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": EVENTS}}
    events.append(anthropic_events.event("message_delta", end))
    events.append(anthropic_events.event("message_stop", {}))
    return events


def per_native_event(events: list[bytes]) -> float:
    """CPU µs per event of a pass-through over ``STREAMS`` streams."""
    door = MessagesDoor("req_bench")
    started = time.process_time()
    for _ in range(STREAMS):
        meter, stream = MessagesMeter(), door.native_stream()
        for raw in events:
            out = meter.observe_batch([raw])
            if out:
                stream.feed(out)
    return (time.process_time() - started) / (STREAMS * len(events)) * 1e6


def per_event(events: list[bytes], door: bool) -> float:
    """CPU µs per event over ``STREAMS`` streams."""
    started = time.process_time()
    for _ in range(STREAMS):
        meter = StreamMeter(client_wants_usage=door)
        stream = MessagesStream("msg_bench") if door else None
        for event in events:
            out = meter.observe_batch([event])
            if stream is not None and out:
                out = stream.feed(out)
    return (time.process_time() - started) / (STREAMS * len(events)) * 1e6


def main() -> None:
    events = answer()
    native = native_answer()
    chat, messages, passed = [], [], []
    for _ in range(ROUNDS):
        chat.append(per_event(events, door=False))
        messages.append(per_event(events, door=True))
        passed.append(per_native_event(native))
    c, m, p = statistics.median(chat), statistics.median(messages), statistics.median(passed)
    print(f"chat relay (meter)           {c:6.2f} µs/event  ({min(chat):.2f}-{max(chat):.2f})")
    print(
        f"messages door (meter + feed) {m:6.2f} µs/event  ({min(messages):.2f}-{max(messages):.2f})"
    )
    print(f"translation alone            {m - c:6.2f} µs/event  ({m / c:.1f}x the meter)")
    print(f"passed through (native meter) {p:5.2f} µs/event  ({min(passed):.2f}-{max(passed):.2f})")


if __name__ == "__main__":
    main()
