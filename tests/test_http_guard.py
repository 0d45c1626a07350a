"""The server below the app, over raw sockets: malformed requests get an
OpenAI-shaped error that echoes nothing, headers and bodies have deadlines,
header sizes and counts have limits, connections per worker have a cap."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from proxy.stores import apikeys
from proxy.web.keys import GUARD_STATS
from tests.conftest import Gateway, StartGateway, gateway_config
from tests.fakes import FakeOpenAI
from tests.waiting import until

CHAT = b'{"model":"echo","messages":[{"role":"user","content":"hi"}]}'


async def connect(gw: Gateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = urlsplit(gw.url).port
    return await asyncio.open_connection("127.0.0.1", port)


async def response(reader: asyncio.StreamReader, within: float = 5.0) -> tuple[int, bytes, bytes]:
    """Status, head and body of one response; the server must close after it."""
    raw = await asyncio.wait_for(reader.read(), within)  # until the server closes
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, head, body


def error_of(body: bytes) -> dict[str, Any]:
    err = orjson.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err  # type: ignore[no-any-return]


async def raw_request(gw: Gateway, data: bytes) -> tuple[int, bytes, bytes]:
    reader, writer = await connect(gw)
    writer.write(data)
    await writer.drain()
    try:
        return await response(reader)
    finally:
        writer.close()


async def test_a_nul_in_a_header_is_refused_without_echoing_it(gateway: Gateway) -> None:
    key = apikeys.generate()
    status, head, body = await raw_request(
        gateway,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + key.encode() + b"\x00\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(CHAT)).encode() + b"\r\n"
        b"\r\n" + CHAT,
    )
    assert status == 400
    assert b"application/json" in head
    assert key.encode() not in head + body and key[:10].encode() not in body
    assert error_of(body)["type"] == "invalid_request_error"


async def test_a_garbage_request_line_is_openai_shaped(gateway: Gateway) -> None:
    status, _, body = await raw_request(gateway, b"\x16\x03\x01 hello sk-secret-abcdefgh\r\n\r\n")
    assert status == 400
    assert b"sk-secret" not in body and b"hello" not in body
    assert error_of(body)["type"] == "invalid_request_error"


def headers_request(extra: bytes) -> bytes:
    return b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + extra + b"\r\n"


async def test_header_size_and_count_limits(gateway: Gateway) -> None:
    # What a real client sends passes: a 10 KB header, 90 headers.
    ok = await raw_request(gateway, headers_request(b"X-Big: " + b"a" * 10_000 + b"\r\n"))
    assert ok[0] == 200
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(90))
    assert (await raw_request(gateway, headers_request(many)))[0] == 200
    # Beyond the limits: 431, OpenAI-shaped, connection closed (response() reads to EOF).
    for extra in (
        b"X-Big: " + b"a" * (64 * 1024 - 100) + b"\r\n",
        b"X-Big: " + b"a" * (16 * 1024 + 10) + b"\r\n",
        b"".join(b"X-H%d: v\r\n" % i for i in range(101)),
    ):
        status, _, body = await raw_request(gateway, headers_request(extra))
        assert status == 431
        assert error_of(body)["code"] == "request_header_fields_too_large"
        assert b"aaaa" not in body


@pytest.fixture
async def quick(start_gateway: StartGateway, fake_openai: FakeOpenAI) -> Gateway:
    server = {"header_timeout_s": 0.5, "body_timeout_s": 0.5, "max_connections": 20}
    return await start_gateway(gateway_config(fake_openai.url, server=server))


async def test_slow_headers_get_a_408_and_a_close(quick: Gateway) -> None:
    reader, writer = await connect(quick)
    started = time.monotonic()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHo")
    await writer.drain()
    status, _, body = await response(reader)
    writer.close()
    assert status == 408
    assert error_of(body)["code"] == "request_timeout"
    assert time.monotonic() - started < 4
    assert quick.app[GUARD_STATS].header_timeouts == 1


async def test_a_silent_connection_is_closed_at_the_header_deadline(quick: Gateway) -> None:
    reader, writer = await connect(quick)
    status, head, _ = await response(reader)  # reads until the server closes
    writer.close()
    assert (status, head) == (0, b"")  # closed without a word, like an idle keep-alive
    assert quick.app[GUARD_STATS].header_timeouts == 1


async def test_a_slow_body_gets_a_408_and_a_close(
    quick: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    reader, writer = await connect(quick)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 10000\r\n\r\n{"
    )
    await writer.drain()
    status, _, body = await response(reader)
    writer.close()
    assert status == 408
    assert error_of(body)["code"] == "request_timeout"
    assert quick.app[GUARD_STATS].body_timeouts == 1
    assert quick.settler.records[-1].status == 408
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_keep_alive_requests_still_work_with_deadlines(quick: Gateway) -> None:
    reader, writer = await connect(quick)
    for _ in range(3):
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(CHAT)).encode() + b"\r\n\r\n" + CHAT
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await asyncio.wait_for(reader.readexactly(length), 5)
    writer.close()


async def test_connections_over_the_cap_are_refused(quick: Gateway) -> None:
    held = [await connect(quick) for _ in range(20)]
    try:
        reader, writer = await connect(quick)
        status, _, body = await response(reader)
        writer.close()
        assert status == 503
        assert error_of(body)["code"] == "service_unavailable"
        assert quick.app[GUARD_STATS].refused == 1
        text = (await raw_request_after_release(quick, held)).decode()
        assert "tollway_connections_refused_total 1" in text
        assert "tollway_open_connections" in text
    finally:
        for _, w in held:
            w.close()


async def raw_request_after_release(
    gw: Gateway, held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
) -> bytes:
    """Free one held connection, wait (bounded) until the server saw it go,
    then scrape /metrics over a fresh one."""
    _, w = held.pop()
    w.close()
    stats = gw.app[GUARD_STATS]
    await until(lambda: stats.open < 20, interval=0.01)
    status, _, body = await raw_request(
        gw, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == 200
    return body
