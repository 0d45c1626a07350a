"""The providers' HTTP/1.1 client (``proxy.providers.pool`` and ``h1``),
through ``proxy.providers.http`` as the adapters use it, against loopback
servers that write the wire byte by byte as the test says: keep-alive,
framing, encodings, interim answers, each timeout, resets, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import gzip
import ipaddress
import itertools
import random
import socket
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httptools
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.config.model import ProviderConfig, Timeouts
from proxy.core.errors import (
    UpstreamConnectError,
    UpstreamRedirect,
    UpstreamStreamBroken,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.providers import h1, http
from proxy.providers.pool import Pool
from proxy.web.keys import UPSTREAM_POOL
from tests.conftest import StartGateway, gateway_config
from tests.fakes import FakeOpenAI
from tests.waiting import until

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
FAST = Timeouts(connect=2, first_byte=2, idle=2, total=10)
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-provider-secret"}


class Wire:
    """A loopback server: ``answer(reader, writer, n)`` runs for each
    request (``n`` counts them from 0 across connections) until it returns
    False or closes; ``accepted`` counts connections, ``requests`` what came."""

    def __init__(self, answer: Answer, tls: ssl.SSLContext | None = None) -> None:
        self.answer, self.tls = answer, tls
        self.accepted = self.ended = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> Wire:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0, ssl=self.tls)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}/v1/chat/completions"

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.append(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                self.requests.append(head + await reader.readexactly(length))
                await self.answer(reader, writer, len(self.requests) - 1)
                if writer.is_closing():
                    return
        finally:
            self.ended += 1
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        await self.server.wait_closed()


@pytest.fixture
async def wires() -> AsyncIterator[Callable[..., Awaitable[Wire]]]:
    made: list[Wire] = []

    async def make(answer: Answer, tls: ssl.SSLContext | None = None) -> Wire:
        made.append(await Wire(answer, tls).start())
        return made[-1]

    yield make
    for w in made:
        await w.close()


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    p = Pool()
    yield p
    await p.close()


def _cfg(url: str, t: Timeouts = FAST) -> ProviderConfig:
    return ProviderConfig(name="p", kind="openai", base_url=url, timeouts=t)


async def _post(pool: Pool, wire: Wire, t: Timeouts = FAST) -> http.Response:
    return await http.post(pool, _cfg(wire.url, t), wire.url, b'{"a":1}', dict(HEADERS), t)


async def _ask(pool: Pool, wire: Wire, t: Timeouts = FAST) -> bytes:
    resp = await _post(pool, wire, t)
    return await http.read_body(resp, _cfg(wire.url, t), t)


def _ok(body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body)
    return head + b"".join(h + b"\r\n" for h in extra) + b"\r\n" + body


def _chunked(body: bytes, rng: random.Random, *extra: bytes) -> bytes:
    out, i = [], 0
    while i < len(body):
        n = rng.randint(1, 40)
        out.append(b"%x\r\n%b\r\n" % (len(body[i : i + n]), body[i : i + n]))
        i += n
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
    return head + b"".join(h + b"\r\n" for h in extra) + b"\r\n" + b"".join(out) + b"0\r\n\r\n"


async def _pieces(writer: asyncio.StreamWriter, wire: bytes, rng: random.Random) -> None:
    """``wire`` written in pieces cut anywhere, a moment apart (the provider's pace)."""
    cuts = sorted(rng.sample(range(1, len(wire)), min(len(wire) - 1, rng.randint(1, 12))))
    for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        writer.write(wire[a:b])
        await writer.drain()
        await asyncio.sleep(0.001)


# --- keep-alive -------------------------------------------------------------


async def test_sequential_requests_share_one_connection(
    wires: Callable[..., Awaitable[Wire]], pool: Pool
) -> None:
    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(_ok(b'{"n":%d}' % n))

    wire = await wires(answer)
    got = [await _ask(pool, wire) for _ in range(20)]
    assert got == [b'{"n":%d}' % n for n in range(20)]
    assert wire.accepted == 1
    first = wire.requests[0]
    assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nContent-Length: 7\r\n" in first and first.endswith(b'\r\n\r\n{"a":1}')
    assert b"accept-encoding" not in first.lower()  # compression is never asked for


async def test_answers_read_or_dropped_leave_nothing_for_the_collector(
    wires: Callable[..., Awaitable[Wire]], pool: Pool
) -> None:
    """A response and its parser must not hold each other once it is whole
    or closed: a cycle per request is only freed by the collector, whose
    collections stall the loop for tens of ms under load."""

    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(_ok(b'{"n":%d}' % n))

    wire = await wires(answer)
    await _ask(pool, wire)  # the connection is open and pooled before counting
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds stays in gc.garbage
    try:
        for _ in range(20):
            assert (await _ask(pool, wire)).startswith(b'{"n":')
        for _ in range(5):
            (await _post(pool, wire)).close()  # dropped unread
        gc.collect()
        # Only the client's own objects: the rest of the process (other
        # tests' leftovers, the loop) may make cycles of its own meanwhile.
        left = [o for o in gc.garbage if isinstance(o, (h1.Response, httptools.HttpResponseParser))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


async def test_connection_close_from_either_side_is_honoured(
    wires: Callable[..., Awaitable[Wire]], pool: Pool
) -> None:
    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(_ok(b"x", b"Connection: close") if n == 0 else _ok(b"y"))
        if n == 0:
            await w.drain()
            w.close()

    wire = await wires(answer)
    assert await _ask(pool, wire) == b"x"
    assert await _ask(pool, wire) == b"y"
    assert wire.accepted == 2
    cfg = _cfg(wire.url)
    resp = await http.post(pool, cfg, wire.url, b"{}", {"Connection": "close"}, FAST)
    assert await http.read_body(resp, cfg) == b"y"
    assert await _ask(pool, wire) == b"y"
    assert wire.accepted == 3  # the request said close: its connection was not kept


async def test_a_pooled_connection_closed_by_the_server_is_retried_once(
    wires: Callable[..., Awaitable[Wire]], pool: Pool
) -> None:
    """The server drops an idle keep-alive connection just as the next
    request goes out on it: sent again on a new one, once."""

    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        if n == 1:
            w.close()  # the request crossed the close: no byte of an answer
            return
        w.write(_ok(b"fine"))

    wire = await wires(answer)
    assert await _ask(pool, wire) == b"fine"
    assert await _ask(pool, wire) == b"fine"
    assert wire.accepted == 2 and len(wire.requests) == 3


async def test_a_new_connection_closed_before_an_answer_is_not_retried(
    wires: Callable[..., Awaitable[Wire]], pool: Pool
) -> None:
    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.close()

    wire = await wires(answer)
    with pytest.raises(UpstreamUnavailable, match="closed the connection before answering"):
        await _ask(pool, wire)
    assert wire.accepted == 1 and len(wire.requests) == 1


# --- bodies ---------------------------------------------------------------


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
async def test_bodies_cut_anywhere_arrive_whole(
    wires: Callable[..., Awaitable[Wire]], pool: Pool, framing: str
) -> None:
    rng = random.Random(framing)
    bodies = [bytes(rng.randrange(256) for _ in range(rng.randint(1, 3000))) for _ in range(15)]

    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        body = bodies[n // 2]
        if framing == "length":
            data = _ok(body)
        elif framing == "chunked":
            data = _chunked(body, rng)
        else:
            data = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body
        await _pieces(w, data, rng)
        if framing == "close":
            w.close()

    wire = await wires(answer)
    for body in bodies:
        assert await _ask(pool, wire) == body
        resp = await _post(pool, wire)
        got = [c async for c in http.iter_body(resp, _cfg(wire.url))]
        assert b"".join(got) == body
    assert wire.accepted == (30 if framing == "close" else 1)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw-deflate"])
async def test_compressed_bodies_are_decoded(
    wires: Callable[..., Awaitable[Wire]], pool: Pool, coding: str
) -> None:
    body = b'{"choices": [' + b'{"text": "hello"},' * 500 + b"{}]}"
    if coding == "gzip":
        packed = gzip.compress(body)
    elif coding == "deflate":
        packed = zlib.compress(body)
    else:
        z = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        packed = z.compress(body) + z.flush()
    name = coding.removeprefix("raw-").encode()
    rng = random.Random(coding)

    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        encoding = b"Content-Encoding: " + name
        framed = _chunked(packed, rng, encoding) if n % 2 else _ok(packed, encoding)
        await _pieces(w, framed, rng)

    wire = await wires(answer)
    for _ in range(4):
        assert await _ask(pool, wire) == body
    assert wire.accepted == 1


async def test_an_encoding_it_cannot_decode_is_a_clear_502(
    wires: Callable[..., Awaitable[Wire]], pool: Pool
) -> None:
    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(_ok(b"\x0b\x02\x80", b"Content-Encoding: br"))

    wire = await wires(answer)
    with pytest.raises(UpstreamUnavailable, match=r"Content-Encoding .*\(br\)"):
        await _ask(pool, wire)


async def test_a_body_that_does_not_decode_is_a_502(
    wires: Callable[..., Awaitable[Wire]], pool: Pool
) -> None:
    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(_ok(b"not gzip at all", b"Content-Encoding: gzip") if n == 0 else _ok(b"ok"))

    wire = await wires(answer)
    with pytest.raises(UpstreamUnavailable):
        await _ask(pool, wire)
    assert await _ask(pool, wire) == b"ok"
    assert wire.accepted == 2  # the garbled answer's connection was not reused


async def test_interim_answers_are_skipped(
    wires: Callable[..., Awaitable[Wire]], pool: Pool
) -> None:
    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await w.drain()
        await asyncio.sleep(0.01)  # the provider's pace: the interim answer alone first
        w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + _ok(b"real", b"X-Real: 1"))

    wire = await wires(answer)
    resp = await _post(pool, wire)
    assert resp.status == 200 and resp.headers["x-real"] == "1" and "link" not in resp.headers
    assert await http.read_body(resp, _cfg(wire.url)) == b"real"
    assert await _ask(pool, wire) == b"real"
    assert wire.accepted == 1


async def test_error_statuses_keep_their_headers(
    wires: Callable[..., Awaitable[Wire]], pool: Pool
) -> None:
    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        body = b'{"error": {"message": "slow down"}}'
        w.write(
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: %d\r\n\r\n%b"
            % (len(body), body)
        )

    wire = await wires(answer)
    resp = await _post(pool, wire)
    assert resp.status == 429 and http.passed_headers(resp.headers) == {"retry-after": "7"}
    assert b"slow down" in await http.read_body(resp, _cfg(wire.url))
    await _post(pool, wire)
    assert wire.accepted == 1  # an error answer read to its end keeps the connection


# --- redirects, resets, refusals ------------------------------------------------


async def test_a_redirect_is_not_followed_and_the_key_goes_nowhere_else(
    wires: Callable[..., Awaitable[Wire]], pool: Pool
) -> None:
    async def elsewhere(_: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(_ok(b"stolen"))

    other = await wires(elsewhere)

    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: %b\r\nContent-Length: 0\r\n\r\n"
            % other.url.encode()
        )

    wire = await wires(answer)
    with pytest.raises(UpstreamRedirect, match="HTTP 307"):
        await _ask(pool, wire)
    assert other.accepted == 0 and other.requests == []


# Answers a provider may cut short: the test closes (or resets) the
# connection after each interesting byte of them.
CUT_SHORT = {
    "302 without a body": b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere.test/\r\n"
    b"Content-Length: 0\r\n\r\n",
    "302 with Connection: close and a body to the close": b"HTTP/1.1 302 Found\r\n"
    b"Location: http://elsewhere.test/\r\nConnection: close\r\n\r\nmoved",
    "302 with a Content-Length body": b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere.test/"
    b"\r\nContent-Length: 5\r\n\r\nmoved",
    "302 with a chunked body": b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere.test/\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nmoved\r\n0\r\n\r\n",
    "200 with a Content-Length body": _ok(b"whole"),
    "200 with a body to the close": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nwhole",
}


@pytest.mark.parametrize("answer_name", sorted(CUT_SHORT))
async def test_a_close_at_any_point_of_an_answer_ends_the_wait_at_once(
    wires: Callable[..., Awaitable[Wire]], answer_name: str
) -> None:
    """The close itself wakes whoever waits: before the head, inside it,
    right after it, inside the body or at its end, on a new or a reused
    connection, by a FIN or a reset. The timeouts here are far away, so an
    exchange the close did not end would show as a hang (once, in CI, the
    redirect test did hang; this did not reproduce it)."""
    wire_bytes = CUT_SHORT[answer_name]
    head_end = wire_bytes.index(b"\r\n\r\n") + 4
    body_to_close = b"Content-Length" not in wire_bytes and b"chunked" not in wire_bytes
    far = Timeouts(connect=30, first_byte=30, idle=30, total=30)
    case: dict[str, object] = {}

    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        if case["reused"] and n == 0:
            w.write(_ok(b"first"))  # kept alive: the cut comes on its second request
            return
        w.write(wire_bytes[: case["cut"]])  # type: ignore[misc]
        await w.drain()
        if case["reset"]:
            w.transport.abort()
        else:
            w.close()

    wire = await wires(answer)
    cuts = sorted({0, 1, head_end - 1, head_end, head_end + 1, len(wire_bytes) - 1})
    for cut, reset, reused in itertools.product(cuts, (False, True), (False, True)):
        case.update(cut=cut, reset=reset, reused=reused)
        wire.requests.clear()
        pool = Pool()
        try:
            async with asyncio.timeout(10):
                if reused:
                    assert await _ask(pool, wire, far) == b"first"
                outcome: object = await _ask(pool, wire, far)
        except (UpstreamRedirect, UpstreamUnavailable) as exc:
            outcome = type(exc)
        except TimeoutError:
            pytest.fail(f"{answer_name}, cut after byte {cut}, {case}: the close woke nobody")
        finally:
            await pool.close()
        if cut < head_end:
            want: object = UpstreamUnavailable
        elif wire_bytes.startswith(b"HTTP/1.1 302"):
            want = UpstreamRedirect
        elif body_to_close:
            want = wire_bytes[head_end:cut]
        else:
            want = UpstreamUnavailable  # the body was cut short
        assert outcome == want, f"{answer_name}, cut after byte {cut}, {case}"


async def test_a_reset_mid_body_is_a_broken_answer(
    wires: Callable[..., Awaitable[Wire]], pool: Pool
) -> None:
    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await w.drain()
        await asyncio.sleep(0.02)  # the provider's pace: the cut after the bytes
        w.transport.abort()

    wire = await wires(answer)
    with pytest.raises(UpstreamUnavailable, match="broke off its response"):
        await _ask(pool, wire)
    resp = await _post(pool, wire)
    with pytest.raises(UpstreamStreamBroken, match="broke off the stream"):
        assert b"".join([c async for c in http.iter_body(resp, _cfg(wire.url))]) == b"partial"
    resp = await _post(pool, wire)
    body = http.EventBody(resp, _cfg(wire.url), FAST)
    with pytest.raises(UpstreamStreamBroken):
        await body.read()


async def test_nothing_listening_is_a_connect_error(pool: Pool) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    with pytest.raises(UpstreamConnectError, match="unreachable"):
        await http.post(pool, _cfg(url), url, b"{}", {}, FAST)


# --- timeouts ---------------------------------------------------------------


async def test_connect_bounds_the_opening_of_a_connection(pool: Pool) -> None:
    """A listener whose accept queue is full (it never accepts): the
    kernel drops further SYNs, so a connect hangs as to a blackholed host."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):  # bounded: enough to fill a backlog of 0
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            fillers.append(s)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        t = Timeouts(connect=0.3, first_byte=5, idle=5, total=10)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(UpstreamTimeout, match=r"did not answer within 0\.3s"):
            await http.post(pool, _cfg(url, t), url, b"{}", {}, t)
        assert 0.3 <= loop.time() - started < 1.5
    finally:
        for s in fillers:
            s.close()
        listener.close()


async def test_first_byte_bounds_the_wait_for_the_answer(
    wires: Callable[..., Awaitable[Wire]], pool: Pool
) -> None:
    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        if n == 1:  # the status and headers, then nothing
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await asyncio.sleep(3600)  # the behaviour: a provider that never answers

    wire = await wires(answer)
    t = Timeouts(connect=2, first_byte=0.3, idle=5, total=10)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamTimeout, match=r"did not answer within 0\.3s"):
        await _ask(pool, wire, t)
    assert 0.3 <= loop.time() - started < 1.5
    resp = await _post(pool, wire, t)
    with pytest.raises(UpstreamTimeout, match=r"did not answer within 0\.3s"):
        await http.read_body(resp, _cfg(wire.url, t), t)
    assert 0.6 <= loop.time() - started < 2.5  # not idle's 5 s: the answer had not begun


async def test_idle_bounds_each_gap_once_the_answer_has_begun(
    wires: Callable[..., Awaitable[Wire]], pool: Pool
) -> None:
    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(4):  # the provider's pace: gaps well within idle
            w.write(b"6\r\ndata: \r\n")
            await w.drain()
            await asyncio.sleep(0.1)
        await asyncio.sleep(3600)  # then it stalls

    wire = await wires(answer)
    t = Timeouts(connect=2, first_byte=5, idle=0.3, total=10)
    resp = await _post(pool, wire, t)
    got = b""
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamTimeout, match=r"stalled for more than 0\.3s mid-stream"):
        async for chunk in http.iter_body(resp, _cfg(wire.url, t), t):
            got += chunk
    assert got == b"data: " * 4
    assert 0.6 <= loop.time() - started < 2.0


async def test_a_slow_reader_is_not_the_providers_silence(
    wires: Callable[..., Awaitable[Wire]], pool: Pool
) -> None:
    """Bytes that wait for the reader are not a provider's silence: the gap
    counts from when the reader could have wanted more (as before, with
    aiohttp's reader, which stops its timer when nobody reads)."""

    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nA\r\n")
        await w.drain()
        await asyncio.sleep(0.6)  # the provider's pace: longer than idle, from its first byte
        w.write(b"1\r\nB\r\n0\r\n\r\n")

    wire = await wires(answer)
    t = Timeouts(connect=2, first_byte=5, idle=0.4, total=10)
    resp = await _post(pool, wire, t)
    await asyncio.sleep(0.5)  # the behaviour: a reader slower than idle takes "A" late
    assert b"".join([c async for c in http.iter_body(resp, _cfg(wire.url, t), t)]) == b"AB"


async def test_total_bounds_a_dripping_answer(
    wires: Callable[..., Awaitable[Wire]], pool: Pool
) -> None:
    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:  # the behaviour: a steady drip, never idle, never done
            w.write(b"1\r\nx\r\n")
            await w.drain()
            await asyncio.sleep(0.05)

    wire = await wires(answer)
    t = Timeouts(connect=2, first_byte=1, idle=0.3, total=0.6)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamTimeout, match=r"exceeded its total time of 0\.6s"):
        await _ask(pool, wire, t)
    assert 0.6 <= loop.time() - started < 1.5


async def test_a_timed_out_connection_is_not_reused(
    wires: Callable[..., Awaitable[Wire]], pool: Pool
) -> None:
    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        if n == 0:
            await asyncio.sleep(3600)  # the behaviour: no answer to the first request
        w.write(_ok(b"late"))

    wire = await wires(answer)
    t = Timeouts(connect=2, first_byte=0.2, idle=1, total=5)
    with pytest.raises(UpstreamTimeout):
        await _ask(pool, wire, t)
    assert await _ask(pool, wire, t) == b"late"
    assert wire.accepted == 2


# --- TLS -------------------------------------------------------------------


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_https_verifies_the_certificate_and_keeps_alive(
    wires: Callable[..., Awaitable[Wire]], tmp_path: Path
) -> None:
    cert, key = _self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(_ok(b"secure %d" % n))

    wire = await wires(answer, server_tls)
    trusting = ssl.create_default_context(cafile=str(cert))
    pool = Pool(tls=trusting)
    try:
        assert [await _ask(pool, wire) for _ in range(3)] == [b"secure 0", b"secure 1", b"secure 2"]
        assert wire.accepted == 1
    finally:
        await pool.close()
    strict = Pool()  # the system's trust store: a self-signed certificate is refused
    try:
        with pytest.raises(UpstreamConnectError):
            await _ask(strict, wire)
    finally:
        await strict.close()


# --- shutdown -------------------------------------------------------------------


async def test_closing_the_pool_closes_every_connection(
    wires: Callable[..., Awaitable[Wire]],
) -> None:
    held = asyncio.Event()

    async def answer(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        if n < 2:
            w.write(_ok(b"ok"))
            return
        held.set()
        await r.read()  # no answer: still pending at shutdown, until the gateway hangs up

    wire = await wires(answer)
    pool = Pool()
    await asyncio.gather(_ask(pool, wire), _ask(pool, wire))  # two idle connections
    pending = asyncio.gather(_ask(pool, wire), return_exceptions=True)  # and a busy one
    await held.wait()
    assert wire.accepted == 2 and len(pool._open) == 2  # one idle, one answering
    await pool.close()
    (outcome,) = await pending
    assert isinstance(outcome, UpstreamUnavailable) and "before answering" in str(outcome)
    assert not pool._open  # closed, and ``close`` waited until they were
    await until(lambda: wire.ended == 2)  # the server saw both go
    assert wire.accepted == 2  # nothing was sent again on a new one


async def test_the_app_closes_its_pool_on_shutdown(
    start_gateway: StartGateway, fake_openai: FakeOpenAI
) -> None:
    gw = await start_gateway(gateway_config(fake_openai.url))
    client = gw.sdk()
    await client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}]
    )
    await client.close()
    pool = gw.app[UPSTREAM_POOL]
    assert pool._open  # the provider's connection, kept alive
    await gw.runner.cleanup()
    assert not pool._open
