"""Streams relayed from the upstream connection's callback (``EventBody.pushed``):
the client gets the same bytes, and the same usage is billed, however the
provider's wire is cut into reads, and a slow client still slows the provider."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.providers import http
from tests.conftest import StartGateway, gateway_config
from tests.loopback import serve_app
from tests.waiting import until

BODY = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "model": "fake-x"}
USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


def _event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return _event({"id": "c1", "object": "chat.completion.chunk", "choices": [choice], **extra})


@dataclass
class ScriptedProvider:
    """An OpenAI-compatible upstream that sends the next request's ``pieces``
    as they are given (one write each, ``gaps`` apart in ms), then ends the
    body, or drops the connection (``cut``)."""

    pieces: list[bytes] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    cut: bool = False
    sent: int = 0  # bytes of the current answer written so far
    transport: asyncio.Transport | None = None
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> ScriptedProvider:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner, base = await serve_app(app, handler_cancellation=True)
        self.url = base + "/v1"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        self.sent, self.transport = 0, request.transport  # type: ignore[assignment]
        for piece, gap in zip(self.pieces, self.gaps, strict=True):
            if gap:
                await asyncio.sleep(gap / 1000)  # the provider's pace, not a wait for the test
            await resp.write(piece)
            self.sent += len(piece)
        if self.cut:
            assert request.transport is not None
            # The provider's pace again: its last bytes, then the cut, as two
            # socket reads (aiohttp's reader raises a cut before the bytes
            # buffered with it, whichever way the gateway reads).
            await asyncio.sleep(0.02)
            request.transport.close()
            return resp
        await resp.write_eof()
        return resp


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedProvider]:
    provider = await ScriptedProvider().start()
    yield provider
    await provider.close()


def _answer(rng: random.Random) -> bytes:
    """A chat stream's wire: content chunks (some CRLF, some comments, an
    odd multi-line event), usually a finish, a usage chunk and [DONE]."""
    events = []
    for i in range(rng.randint(1, 25)):
        events.append(_chunk({"content": f"w{i} " * rng.randint(1, 4)}, usage=None))
        if rng.random() < 0.1:
            events.append(b": ping\n\n")
        if rng.random() < 0.05:
            events.append(b"event: note\ndata: {}\n\n")
    if rng.random() < 0.9:
        events.append(_chunk({}, "stop", usage=None))
    if rng.random() < 0.8:
        events.append(_event({"id": "c1", "choices": [], "usage": USAGE}))
    if rng.random() < 0.8:
        events.append(b"data: [DONE]\n\n")
    wire = b"".join(events)
    return wire.replace(b"\n", b"\r\n") if rng.random() < 0.2 else wire


def _cut(wire: bytes, rng: random.Random) -> list[bytes]:
    """``wire`` in 1 to 30 pieces cut anywhere."""
    n = min(len(wire) - 1, rng.randint(0, 29))
    cuts = sorted(rng.sample(range(1, len(wire)), n))
    return [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]


async def _relay(
    gw: Any,
    scripted: ScriptedProvider,
    pieces: list[bytes],
    gaps: list[float],
    cut: bool,
    body: dict[str, Any],
) -> tuple[bytes, Any]:
    scripted.pieces, scripted.gaps, scripted.cut = pieces, gaps, cut
    before = len(gw.settler.records)
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base_url + "/chat/completions", json=body) as r,
    ):
        got = await r.read()
    await until(lambda: len(gw.settler.records) > before)
    record = gw.settler.records[-1]
    return got, (r.status, record.status, record.usage, record.error_code)


async def test_any_cut_of_the_wire_relays_the_same_bytes_and_bills_the_same(
    start_gateway: StartGateway, scripted: ScriptedProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each answer sent twice: in one piece (read in one go, by ``read``)
    and cut into pieces a few ms apart (the later ones pushed): the client
    gets the same bytes and the same usage row, complete or cut off."""
    pushed = 0
    take = http.EventBody._take

    def counting(self: http.EventBody, data: bytes) -> None:
        nonlocal pushed
        pushed += 1
        take(self, data)

    monkeypatch.setattr(http.EventBody, "_take", counting)
    gw = await start_gateway(gateway_config(scripted.url))
    rng = random.Random(12)
    for i in range(40):
        wire = _answer(rng)
        cut = rng.random() < 0.3
        if cut:
            wire = wire[: rng.randint(1, len(wire))]
        body = BODY if i % 2 else {**BODY, "stream_options": {"include_usage": True}}
        whole = await _relay(gw, scripted, [wire], [0.0], cut, body)
        pieces = _cut(wire, rng)
        gaps = [0.0] + [rng.choice((0.0, 1.0, 3.0)) for _ in pieces[1:]]
        assert await _relay(gw, scripted, pieces, gaps, cut, body) == whole, (pieces, cut)
    assert pushed > 100  # the later reads were relayed from the connection's callback


async def test_a_provider_error_event_mid_stream_ends_it_the_same_way(
    start_gateway: StartGateway, scripted: ScriptedProvider
) -> None:
    """A provider's error event arriving in a pushed read: the events before
    it reach the client, then the gateway's error event; the row is a 502."""
    gw = await start_gateway(gateway_config(scripted.url))
    first = _chunk({"content": "a"})
    error = _event({"error": {"message": "overloaded", "type": "server_error"}})
    pieces = [first, _chunk({"content": "b"}), _chunk({"content": "c"}) + error + first]
    got, (_, status, usage, _) = await _relay(gw, scripted, pieces, [0.0, 5.0, 5.0], False, BODY)
    events = [e for e in got.split(b"\n\n") if e]
    assert events[:3] == [
        first.strip(),
        _chunk({"content": "b"}).strip(),
        _chunk({"content": "c"}).strip(),
    ]
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert "overloaded" in last["error"]["message"] and len(events) == 4
    assert status == 502 and usage.completion_tokens >= 1


async def test_a_slow_client_slows_the_provider_down(
    start_gateway: StartGateway, scripted: ScriptedProvider
) -> None:
    """A client that stops reading: the gateway stops reading the provider
    (whose socket then fills) instead of taking the answer into memory;
    once the client reads again, it gets all of it."""
    gw = await start_gateway(gateway_config(scripted.url))
    text = "x" * 8000
    pieces = [_chunk({"content": text}) for _ in range(4000)]  # ~32 MB
    usage = _event({"id": "c1", "choices": [], "usage": USAGE})  # no counting of 32 MB at settle
    pieces += [_chunk({}, "stop"), usage, b"data: [DONE]\n\n"]
    scripted.pieces, scripted.gaps, scripted.cut = pieces, [0.0] * len(pieces), False
    total = sum(len(p) for p in pieces)
    async with aiohttp.ClientSession() as s:
        body = {**BODY, "stream_options": {"include_usage": True}}
        resp = await s.post(gw.base_url + "/chat/completions", json=body)
        assert resp.status == 200
        got = len(await resp.content.readany())

        def provider_blocked() -> bool:
            t = scripted.transport
            return t is not None and t.get_write_buffer_size() > 0

        await until(provider_blocked, limit=20)
        # The window in which the provider must NOT get further: a gateway
        # reading on regardless takes the ~32 MB in well under a second.
        await asyncio.sleep(1.5)
        assert scripted.sent < total / 2, (scripted.sent, total)
        async with asyncio.timeout(60):
            while chunk := await resp.content.readany():
                got += len(chunk)
        resp.release()
    assert scripted.sent == total
    assert got == total
    await until(lambda: gw.settler.records)
    assert gw.settler.records[-1].usage.source == "provider"
