"""Golden cases for the usage side counter: present, absent, zeros, cut."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import orjson

from proxy.core.metering import StreamMeter, reply_usage, settled_usage
from proxy.core.sse import DONE, data_event
from proxy.core.usage import Usage

BODY: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Count to three"}],
}


def _chunk(content: str | None = None, usage: dict[str, int] | None = None) -> bytes:
    choices = (
        []
        if content is None
        else [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    )
    obj: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk", "choices": choices}
    if usage is not None:
        obj["usage"] = usage
    return data_event(obj)


def _run(events: list[bytes], wants_usage: bool = False) -> tuple[StreamMeter, list[bytes]]:
    meter = StreamMeter(client_wants_usage=wants_usage)
    out = [o for e in events if (o := meter.observe(e)) is not None]
    return meter, out


def test_provider_usage_chunk_is_used_and_stripped() -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    events = [_chunk("one"), _chunk(" two"), _chunk(usage=usage), DONE]
    meter, out = _run(events)
    assert meter.result(BODY, "chat", "gpt-4o-mini").as_dict() == {
        "prompt_tokens": 12,
        "completion_tokens": 3,
        "source": "provider",
    }
    assert out == [events[0], events[1], DONE]  # the client did not ask for usage
    _, kept = _run(events, wants_usage=True)
    assert kept == events


def test_absent_usage_is_estimated_with_tiktoken() -> None:
    meter, _ = _run([_chunk("one"), _chunk(" two"), _chunk(" three"), DONE])
    usage = meter.result(BODY, "chat", "gpt-4o-mini")
    assert usage.source == "estimated"
    assert usage.completion_tokens == 3  # "one two three" is 3 cl100k tokens
    assert usage.prompt_tokens == 3 + 3 + 3 + 1  # framing + "user" + "Count to three"


def test_zero_usage_for_a_real_answer_is_estimated() -> None:
    zeros = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    meter, _ = _run([_chunk("one"), _chunk(usage=zeros), DONE])
    usage = meter.result(BODY, "chat", "gpt-4o-mini")
    assert usage.source == "estimated" and usage.completion_tokens == 1


def test_cut_stream_counts_what_was_delivered() -> None:
    meter, _ = _run([_chunk("one"), _chunk(" two")])
    assert not meter.done
    usage = meter.result(BODY, "chat", "gpt-4o-mini")
    assert (usage.completion_tokens, usage.source) == (2, "estimated")


def test_non_stream_reply_usage() -> None:
    response = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "one two"}}]}
    reported = Usage(prompt_tokens=5, completion_tokens=2, source="provider")
    assert reply_usage(reported, response, BODY, "chat", "gpt-4o-mini") is reported
    estimated = reply_usage(None, response, BODY, "chat", "gpt-4o-mini")
    assert (estimated.completion_tokens, estimated.source) == (2, "estimated")


def test_tool_call_arguments_are_counted() -> None:
    chunk = data_event(
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {"index": 0, "function": {"name": "get", "arguments": '{"a": 1}'}}
                        ]
                    },
                }
            ]
        }
    )
    meter, _ = _run([chunk, DONE])
    assert meter.result(BODY, "chat", "gpt-4o-mini").completion_tokens > 0
    assert orjson.loads(chunk[6:])  # fixture sanity


async def test_crlf_split_across_reads_keeps_events_apart() -> None:
    from proxy.core.sse import iter_events

    wire = b'data: {"a": 1}\r\n\r\ndata: {"b": 2}\r\n\r\n'
    for cut in range(1, len(wire)):
        for cut2 in range(cut, len(wire)):

            async def pieces(c1: int = cut, c2: int = cut2) -> Any:
                for piece in (wire[:c1], wire[c1:c2], wire[c2:]):
                    if piece:
                        yield piece

            events = [e async for e in iter_events(pieces())]
            assert events == [b'data: {"a": 1}\n\n', b'data: {"b": 2}\n\n'], (cut, cut2)


async def test_events_are_batched_per_upstream_read() -> None:
    from proxy.core.sse import IncompleteEvent, iter_event_batches

    a, b, c = b"data: 1\n\n", b": ping\n\n", b"data: 2\n\n"
    reads = [a + b + c[:4], c[4:], b"\n\n", a + a, b"data: cut"]

    async def pieces() -> Any:
        for piece in reads:
            yield piece

    got = []
    try:
        async for batch in iter_event_batches(pieces()):
            got.append(batch)
    except IncompleteEvent as exc:
        assert exc.tail == b"data: cut"
    else:
        raise AssertionError("a cut event must raise")
    # One list per read that completed events; a read completing none (or only
    # blank lines) yields nothing, and no list is ever empty.
    assert got == [[a, b], [c], [a, a]]


def test_a_batch_is_metered_event_by_event_and_sent_as_one() -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    events = [_chunk("one"), b": ping\n\n", _chunk(" two"), _chunk(usage=usage), DONE]
    meter = StreamMeter(client_wants_usage=False)
    assert meter.observe_batch(events[:2]) == events[0] + events[1]
    # The usage chunk Tollway asked for is dropped from the middle of a batch.
    assert meter.observe_batch(events[2:]) == events[2] + DONE
    assert meter.done and meter.usage is not None and meter.usage.total_tokens == 15
    assert meter.observe_batch([_chunk(usage=usage)]) == b""  # nothing left to send
    assert meter.payloads == [events[0][6:-2], events[2][6:-2]]


async def test_counting_at_settle_does_not_stall_the_event_loop() -> None:
    """A stream without provider usage is counted with tiktoken at settle:
    in a thread, so the other requests on the worker keep moving."""
    words = " ".join(f"word{i % 977} lorem ipsum" for i in range(200_000))
    meter, _ = _run([_chunk(words), DONE])
    t0 = time.perf_counter()
    inline = meter.result(BODY, "chat", "gpt-4o-mini")
    took = time.perf_counter() - t0
    assert took > 0.05, "the text is too small to show a stall"

    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async def settle() -> Usage:
        await asyncio.sleep(0.01)
        try:
            return await settled_usage(meter, BODY, "chat", "gpt-4o-mini")
        finally:
            done.set()

    _, usage = await asyncio.gather(ticker(), settle())
    assert usage == inline and usage.source == "estimated"
    assert max(gaps) < took / 2, f"loop stalled {max(gaps):.3f}s of a {took:.3f}s count"


def _reads(wire: bytes, rng: random.Random) -> list[bytes]:
    """``wire`` cut into 1 to 5 reads at random places."""
    cuts = sorted(rng.sample(range(1, len(wire)), min(len(wire) - 1, rng.randint(0, 4))))
    return [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]


async def test_the_relay_splitter_finds_the_events_iter_event_batches_finds() -> None:
    """``EventSplitter`` (the relay's, one bytes per read) against the
    event-list splitter on random wires and cuts: CRLF, blank events,
    comments, multi-line events, a cut last event."""
    from proxy.core.sse import EventSplitter, IncompleteEvent, iter_event_batches, split_events

    rng = random.Random(7)
    parts = [b"data: x", b"\n", b"\r", b" ", b"\n\n", DONE, b": ping", b"event: e\ndata: y"]
    for _ in range(3000):
        wire = b"".join(rng.choice(parts) for _ in range(rng.randint(1, 12)))
        reads = _reads(wire, rng)

        async def pieces(reads: list[bytes] = reads) -> Any:
            for piece in reads:
                yield piece

        want: list[bytes] = []
        tail = b""
        try:
            async for batch in iter_event_batches(pieces()):
                want.append(b"".join(batch))
        except IncompleteEvent as exc:
            tail = exc.tail
        splitter = EventSplitter()
        got = [events for piece in reads if (events := splitter.feed(piece))]
        assert (got, splitter.tail()) == (want, tail), reads
        assert all(b"".join(split_events(events)) == events for events in got)


def test_a_read_is_metered_as_its_events_one_by_one() -> None:
    """``observe_read`` on random reads of a stream forwards the same bytes
    and finds the same usage, finish and payloads as ``observe`` on each
    event (the usage chunk dropped when the client did not ask for it)."""
    from proxy.core.sse import EventSplitter, event_data

    rng = random.Random(11)
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    for i in range(1500):
        envelope = {"id": "chatcmpl-1", "object": "chat.completion.chunk"} if i % 2 else {}
        events = [
            data_event({**envelope, "choices": [{"index": 0, "delta": {"content": text}}]})
            for text in rng.choices(["a", "[DONE]", '"usage":{', "b c"], k=rng.randint(0, 6))
        ]
        if i % 3 == 0:
            events.insert(rng.randint(0, len(events)), b": ping\n\n")
        if i % 5 == 0:
            events.insert(rng.randint(0, len(events)), b"data: {}\n\n")
        events.append(data_event({**envelope, "choices": [{"index": 0, "finish_reason": "stop"}]}))
        if rng.random() < 0.7:
            events.append(data_event({**envelope, "choices": [], "usage": usage}))
        events.append(DONE)
        wants = rng.random() < 0.5
        one_by_one = StreamMeter(wants)
        sent = b"".join(out for e in events if (out := one_by_one.observe(e)) is not None)
        meter, splitter = StreamMeter(wants), EventSplitter()
        relayed = b"".join(
            meter.observe_read(read)
            for piece in _reads(b"".join(events), rng)
            if (read := splitter.feed(piece))
        )
        assert relayed == sent
        forwarded = [e for e in events if e != DONE and (wants or b'"usage":{"' not in e)]
        payloads = [d for e in forwarded if (d := event_data(e)) is not None]
        assert meter.payloads == one_by_one.payloads == payloads
        assert (meter.usage, meter.done, meter.complete()) == (
            one_by_one.usage,
            one_by_one.done,
            one_by_one.complete(),
        )
