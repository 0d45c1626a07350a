"""Fake Anthropic, Gemini and Azure OpenAI servers: real aiohttp apps on
127.0.0.1 port 0 speaking each provider's wire format.

Answers are the recorded-shape fixtures under ``tests/fixtures/<provider>/``,
chosen by the requested model name (``claude-tools`` serves ``tools.json`` or
``tools.sse``), so the golden tests and the end-to-end tests share one source
of truth. Streams are written in small pieces, so the gateway's event
splitting is exercised over a real socket. Every request is recorded with its
path, query, headers and body for the tests to assert on.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
from aiohttp import web

from proxy.core.sse import event_data
from tests.fakes import FakeOpenAI
from tests.loopback import serve_app

FIXTURES = Path(__file__).parent / "fixtures"
PIECE = 7  # bytes per write: events arrive cut at arbitrary points


def fixture(provider: str, name: str) -> bytes:
    return (FIXTURES / provider / name).read_bytes()


@dataclass
class Request:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeServer:
    seen: list[Request] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    _runner: web.AppRunner | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> FakeServer:
        app = web.Application()
        self.routes(app)
        self._runner, self.url = await serve_app(app, handler_cancellation=True)
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def record(self, request: web.Request) -> dict[str, Any]:
        body = orjson.loads(await request.read())
        self.seen.append(Request(request.path, dict(request.query), dict(request.headers), body))
        return body  # type: ignore[no-any-return]

    async def send_sse(
        self, request: web.Request, raw: bytes, hold_after: int = 0
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(0, len(raw), PIECE):
                await resp.write(raw[i : i + PIECE])
                if hold_after and i <= hold_after < i + PIECE:
                    await self.release.wait()
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnected.set()
            raise
        return resp


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(obj), status=status, headers=headers, content_type="application/json"
    )


class FakeAnthropic(FakeServer):
    """``POST /v1/messages``. Models: ``claude-<fixture>`` serves the fixture;
    ``claude-overloaded`` answers 529, ``claude-fail`` 500 ``api_error``;
    ``claude-held`` streams ``text.sse`` but stops after the first event
    until ``release`` is set; ``claude-heldtext`` streams ``thinking.sse``
    and stops after its first text delta."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self._messages)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await self.record(request)
        name = str(body.get("model", "")).removeprefix("claude-")
        if name == "overloaded":
            raw = fixture("anthropic", "overloaded.json")
            return web.Response(body=raw, status=529, headers={"retry-after": "3"})
        if name == "badrequest":
            err = {"type": "invalid_request_error", "message": "messages: field required"}
            return _json({"type": "error", "error": err}, status=400)
        if name == "fail":
            err = {"type": "api_error", "message": "Internal server error"}
            return _json({"type": "error", "error": err}, status=500)
        if body.get("stream"):
            if name == "heldtext":
                raw = fixture("anthropic", "thinking.sse")
                at = raw.index(b"\n\n", raw.index(b"text_delta")) + 1
                return await self.send_sse(request, raw, at)
            if name == "held":
                raw = fixture("anthropic", "text.sse")
                return await self.send_sse(request, raw, raw.index(b"\n\n") + 2)
            return await self.send_sse(request, fixture("anthropic", f"{name}.sse"))
        return web.Response(
            body=fixture("anthropic", f"{name}.json"), content_type="application/json"
        )


EMBEDDING = [0.25, -0.5, 0.75]


class FakeGemini(FakeServer):
    """``POST /v1beta/models/{model}:{method}``. Models: ``gemini-<fixture>``;
    ``gemini-unavailable`` answers 503, ``gemini-quota`` 429. Embeddings
    answer ``EMBEDDING`` scaled by the input's position."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1beta/models/{target}", self._models)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        body = await self.record(request)
        model, _, method = request.match_info["target"].rpartition(":")
        name = model.removeprefix("gemini-")
        if name in ("unavailable", "quota"):
            return self._error(name)
        if method == "batchEmbedContents":
            vectors = [[v * (i + 1) for v in EMBEDDING] for i in range(len(body["requests"]))]
            return _json({"embeddings": [{"values": v} for v in vectors]})
        if method == "streamGenerateContent":
            assert request.query.get("alt") == "sse"
            return await self.send_sse(request, fixture("gemini", f"{name}.sse"))
        assert method == "generateContent", method
        return web.Response(body=fixture("gemini", f"{name}.json"), content_type="application/json")

    @staticmethod
    def _error(name: str) -> web.Response:
        if name == "quota":
            err = {"code": 429, "message": "Quota exceeded", "status": "RESOURCE_EXHAUSTED"}
            return _json({"error": err}, status=429, headers={"retry-after": "0"})
        message = "The model is overloaded. Please try again later."
        return _json({"error": {"code": 503, "message": message, "status": "UNAVAILABLE"}}, 503)


class FakeAzure(FakeOpenAI):
    """Azure OpenAI: ``/openai/deployments/{deployment}/...?api-version=``, an
    ``api-key`` header and OpenAI's bodies (behaviours as ``FakeOpenAI``,
    chosen by the deployment name). The ``content-filter`` deployment streams
    ``fixtures/azure/content_filter.sse``: Azure's extra prompt-filter chunk
    (empty ``choices``), ``content_filter_results`` and ``"usage": null`` on
    every chunk. ``queries`` records each query string."""

    queries: list[dict[str, str]]

    async def start(self) -> FakeAzure:
        self.queries = []
        app = web.Application()
        base = "/openai/deployments/{deployment}"
        app.router.add_post(base + "/chat/completions", self._azure_chat)
        app.router.add_post(base + "/completions", self._with_query(self._completions))
        app.router.add_post(base + "/embeddings", self._with_query(self._embeddings))
        self._runner, self.url = await serve_app(app, handler_cancellation=True)
        return self

    def _with_query(self, handler: Any) -> Any:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            self.queries.append(dict(request.query))
            return await handler(request)  # type: ignore[no-any-return]

        return wrapped

    async def _azure_chat(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["deployment"] != "content-filter":
            return await self._with_query(self._chat)(request)  # type: ignore[no-any-return]
        self.queries.append(dict(request.query))
        await self._record(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        raw = fixture("azure", "content_filter.sse")
        for i in range(0, len(raw), PIECE):
            await resp.write(raw[i : i + PIECE])
        await resp.write_eof()
        return resp


# -- golden-test helpers --------------------------------------------------------


class Translator(Protocol):
    def feed(self, event: bytes) -> list[bytes]: ...

    def end(self) -> list[bytes]: ...


TranslateStream = Callable[[AsyncIterable[bytes], Any, str], AsyncIterator[bytes]]


async def translate_pieces(
    translate: TranslateStream, pieces: list[bytes], translator: Translator
) -> list[bytes]:
    """Run a provider's stream translation over body bytes cut into ``pieces``."""

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    return [event async for event in translate(body(), translator, "fake")]


def decoded(events: list[bytes]) -> list[Any]:
    """OpenAI SSE events as JSON payloads; ``[DONE]`` and comments as text."""
    out: list[Any] = []
    for event in events:
        assert event.endswith(b"\n\n") and event.count(b"\n\n") == 1, event
        data = event_data(event)
        if data is None or data == b"[DONE]":
            out.append(event.decode().strip())
        else:
            out.append(orjson.loads(data))
    return out


def golden(provider: str, name: str, actual: Any) -> None:
    """Compare with ``fixtures/<provider>/expected/<name>.json``;
    ``TOLLWAY_UPDATE_GOLDEN=1`` rewrites the file instead (review the diff)."""
    path = FIXTURES / provider / "expected" / f"{name}.json"
    if os.environ.get("TOLLWAY_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(orjson.dumps(actual, option=orjson.OPT_INDENT_2) + b"\n")
    assert actual == orjson.loads(path.read_bytes())
