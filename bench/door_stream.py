"""CPU per streamed event: the Responses door's translation against the chat relay's own work.

    .venv/bin/python bench/door_stream.py [--events 2000] [--rounds 20]

One chat stream of ``--events`` content chunks (a word each, then a finish,
a usage chunk and ``[DONE]``) goes through, per event as the relay feeds it:
the chat relay's work (``StreamMeter.observe_batch``) and, for the door, the
meter followed by ``ResponsesStream.feed``. In process, no network: the
translation's own cost, best of ``--rounds`` (process CPU time).
"""

from __future__ import annotations

import argparse
import time

import orjson

from proxy.core.metering import StreamMeter
from proxy.core.sse import DONE
from proxy.doors import responses_object as obj
from proxy.doors.responses_request import asked
from proxy.doors.responses_stream import ResponsesStream


def chat_events(n: int) -> list[bytes]:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def event(choices: list[object], **extra: object) -> bytes:
        return b"data: " + orjson.dumps({**base, "choices": choices, **extra}) + b"\n\n"

    words = [event([{"index": 0, "delta": {"content": f" w{i}"}}]) for i in range(n)]
    finish = event([{"index": 0, "delta": {}, "finish_reason": "stop"}])
    usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": n + 5}
    return [*words, finish, event([], usage=usage), DONE]


def run(events: list[bytes], door: bool) -> float:
    start = time.process_time()
    meter = StreamMeter(True)
    stream = ResponsesStream(obj.Ids(), asked({"model": "m", "input": "x"}), lambda _: None)
    for e in events:
        out = meter.observe_batch([e])
        if door and out:
            stream.feed(out)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    events = chat_events(args.events)
    chat = min(run(events, False) for _ in range(args.rounds))
    door = min(run(events, True) for _ in range(args.rounds))
    n = len(events)
    print(f"events per stream: {n}")
    print(f"chat relay (meter):           {chat / n * 1e6:6.2f} µs/event")
    print(f"responses door (meter+feed):  {door / n * 1e6:6.2f} µs/event")
    print(f"translation alone:            {(door - chat) / n * 1e6:6.2f} µs/event")


if __name__ == "__main__":
    main()
