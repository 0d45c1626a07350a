"""The client has its whole answer before the request settles.

Settling (the access line, metrics, the stages' settle hooks, the billing
row) runs after the answer went out, so a slow settle step does not delay
the client; and a client that leaves while its answer is being written is
still settled: its row says 499 and bills what the provider reported.

The clients here read from a thread of their own: the slow settle step
blocks the event loop, which would stop a client running on it too.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.core.record import UsageRecord
from proxy.web.keys import LIFECYCLE
from tests.conftest import StartGateway, gateway_config
from tests.fakes import FAKE_USAGE, FakeOpenAI
from tests.loopback import serve_app
from tests.test_access_log import access_lines
from tests.waiting import until

# How long the slow settle step holds the loop at most: a bound, not a
# guess at how long anything takes; the old order (settle, then write)
# spent all of it, the client never having its answer meanwhile.
HOLD_S = 15.0


def _post(url: str, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    """One request from this thread, read to its end (a stream's last chunk too)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", path, orjson.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/v1/chat/completions", {"model": "fake-model"}, 200),
        ("/v1/chat/completions", {"model": "fake-model", "stream": True}, 200),
        ("/v1/messages", {"model": "fake-model", "max_tokens": 16}, 200),
        ("/v1/chat/completions", {"model": "no-such-model"}, 404),
    ],
    ids=["chat", "stream", "messages-door", "refusal"],
)
async def test_a_slow_settle_step_does_not_hold_back_the_answer(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    body: dict[str, Any],
    expected: int,
) -> None:
    gw = await start_gateway(gateway_config(fake_openai.url))
    answered = threading.Event()
    had_answer: list[bool] = []

    def slow_settle(record: UsageRecord) -> None:
        # Blocks the loop until the client has read its whole answer (or
        # the bound passes): the client can only get it if it was sent first.
        had_answer.append(answered.wait(HOLD_S))
        gw.settler.records.append(record)

    monkeypatch.setattr(gw.settler, "settle", slow_settle)
    payload = {**body, "messages": [{"role": "user", "content": "hi"}]}
    status_and_body: list[tuple[int, bytes]] = []

    def client() -> None:
        status_and_body.append(_post(gw.url, path, payload))
        answered.set()

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    await until(lambda: had_answer, limit=HOLD_S + 30, what="the request settled")
    await until(lambda: not thread.is_alive(), limit=30, what="the client thread ended")
    status, answer = status_and_body[0]
    assert status == expected, answer
    if body.get("stream"):
        assert answer.rstrip().endswith(b"data: [DONE]")
    elif status == 200:
        assert orjson.loads(answer)["usage"]
    else:
        assert orjson.loads(answer)["error"]["code"] == "model_not_found"
    assert had_answer == [True], "the client's answer waited for the settle step"
    (record,) = gw.settler.records
    assert record.status == expected and not record.client_disconnected
    if status == 200:
        assert record.usage.prompt_tokens == FAKE_USAGE["prompt_tokens"]


BIG = 24 * 1024 * 1024  # more than loopback's socket buffers hold: the write waits on the client


@pytest.fixture
async def big_provider() -> AsyncIterator[str]:
    """An OpenAI-compatible provider whose answer is 24 MB, with its usage."""
    answer = orjson.dumps(
        {
            "id": "chatcmpl-big",
            "object": "chat.completion",
            "created": 0,
            "model": "big",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "a" * BIG},
                }
            ],
            "usage": dict(FAKE_USAGE),
        }
    )

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=answer, content_type="application/json")

    app = web.Application()
    app.router.add_post("/chat/completions", chat)
    runner, url = await serve_app(app)
    yield url
    await runner.cleanup()


def _ask_big(url: str) -> socket.socket:
    """A raw socket that sent a chat request for the big answer. A small
    receive buffer keeps the kernel from taking the whole answer on the
    client's behalf."""
    host, port = url.removeprefix("http://").split(":")
    body = orjson.dumps({"model": "big", "messages": [{"role": "user", "content": "hi"}]})
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(60)
    try:
        sock.connect((host, int(port)))
        sock.sendall(head + body)
    except BaseException:
        sock.close()
        raise
    return sock


def _leave_after_headers(url: str) -> bytes:
    """Send a chat request, read the first bytes of the answer, and go: the
    rest of it is still being written."""
    sock = _ask_big(url)
    try:
        return sock.recv(4096)
    finally:
        sock.close()  # unread data: the kernel resets the connection


async def test_a_client_gone_while_its_answer_is_written_is_still_settled(
    start_gateway: StartGateway, big_provider: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="tollway.access")
    config = gateway_config(big_provider)
    config["models"] = [{"name": "big", "targets": [{"provider": "fake", "model": "big"}]}]
    gw = await start_gateway(config)
    got: list[bytes] = []
    thread = threading.Thread(target=lambda: got.append(_leave_after_headers(gw.url)), daemon=True)
    thread.start()
    await until(lambda: gw.settler.records, limit=60, what="the request settled")
    await until(lambda: not thread.is_alive(), limit=30, what="the client thread ended")
    assert got and got[0].startswith(b"HTTP/1.1 200")  # the answer had begun
    (record,) = gw.settler.records
    assert record.status == 499 and record.client_disconnected
    # What the provider reported is billed: it did the work.
    assert record.usage.prompt_tokens == FAKE_USAGE["prompt_tokens"]
    assert record.usage.completion_tokens == FAKE_USAGE["completion_tokens"]
    await until(lambda: access_lines(caplog), what="the access line")
    (line,) = access_lines(caplog)
    assert line["status"] == 499 and line["client_disconnected"] is True


def _read_slowly(url: str, begun: threading.Event, go_on: threading.Event) -> tuple[int, int]:
    """Send a chat request, read the first bytes of the answer, then wait
    (``go_on``, bounded) before reading the rest to the end: the answer's
    Content-Length and how many body bytes came."""
    sock = _ask_big(url)
    try:
        got = sock.recv(4096)
        while b"\r\n\r\n" not in got:
            got += sock.recv(4096)
        begun.set()
        go_on.wait(HOLD_S)
        headers, rest = got.split(b"\r\n\r\n", 1)
        length = next(
            int(line.split(b":", 1)[1])
            for line in headers.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        received = len(rest)
        while received < length and (chunk := sock.recv(1 << 20)):
            received += len(chunk)
        return length, received
    finally:
        sock.close()


async def test_a_shutdown_abort_during_a_slow_read_still_delivers_the_whole_answer(
    start_gateway: StartGateway, big_provider: str
) -> None:
    config = gateway_config(big_provider)
    config["models"] = [{"name": "big", "targets": [{"provider": "fake", "model": "big"}]}]
    gw = await start_gateway(config)
    lifecycle = gw.app[LIFECYCLE]
    begun, go_on = threading.Event(), threading.Event()
    got: list[tuple[int, int]] = []
    thread = threading.Thread(
        target=lambda: got.append(_read_slowly(gw.url, begun, go_on)), daemon=True
    )
    thread.start()
    try:
        await until(begun.is_set, limit=60, what="the answer began")
        # The grace passes while the client has not read: the handler is
        # aborted while its answer is written.
        assert await lifecycle.drain(grace=0.05) == 1
        await until(lambda: gw.settler.records, limit=30, what="the request settled")
    finally:
        go_on.set()
    await until(lambda: not thread.is_alive(), limit=60, what="the client read to the end")
    ((length, received),) = got
    assert received == length  # the answer was whole in the connection's buffer
    (record,) = gw.settler.records
    assert record.status == 200 and not record.client_disconnected
    assert record.usage.completion_tokens == FAKE_USAGE["completion_tokens"]
