"""The Messages front door's stream translation: CPU per event, in process.

    .venv/bin/python -m bench.door_messages

A 200-event chat answer (the long-stream benchmark's size of text delta,
then the finish, the usage chunk and ``[DONE]``), one event per upstream
read as a model's tokens come, run through what the relay does per read:
``StreamMeter.observe_batch`` alone (a chat client) and the meter followed
by ``MessagesStream.feed`` (an Anthropic client). Prints the median CPU
time (process_time) per event of each over rounds of streams, and the
translation's own cost per event. In process, no sockets: the whole
gateway's CPU per event (the chat relay's figure in bench/RESULTS.md) is
several times either number.
"""

from __future__ import annotations

import statistics
import time

from proxy.core.metering import StreamMeter
from proxy.core.sse import DONE, data_event
from proxy.doors.messages import MessagesStream

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
    chat, messages = [], []
    for _ in range(ROUNDS):
        chat.append(per_event(events, door=False))
        messages.append(per_event(events, door=True))
    c, m = statistics.median(chat), statistics.median(messages)
    print(f"chat relay (meter)           {c:6.2f} µs/event  ({min(chat):.2f}-{max(chat):.2f})")
    print(
        f"messages door (meter + feed) {m:6.2f} µs/event  ({min(messages):.2f}-{max(messages):.2f})"
    )
    print(f"translation alone            {m - c:6.2f} µs/event  ({m / c:.1f}x the meter)")


if __name__ == "__main__":
    main()
