"""Fake providers: real aiohttp servers on 127.0.0.1, port 0, real wire format.

``FakeOpenAI`` speaks OpenAI's chat/completions/embeddings API. Its behaviour
is chosen by the requested model name (so one server can play many parts in
a test), and it records every request it saw, headers included.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp_sse import sse_response

from tests import fakes_responses
from tests.loopback import serve_app

WORDS = ["Hello", " from", " the", " fake", " provider", "."]
FAKE_USAGE = {"prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17}


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeOpenAI:
    """Behaviours by model name:

    ``usage-none`` no usage anywhere; ``usage-zero`` all-zero usage;
    ``cut`` stream dies after two chunks; ``held`` sends one chunk, then waits
    for ``release``; ``heartbeat`` interleaves ``: ping`` comments;
    ``error-<status>`` answers that status with an OpenAI error body;
    ``hang`` never answers; ``garbage`` answers 200 with a non-JSON body.
    """

    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> FakeOpenAI:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/responses", self._responses)
        self._runner, url = await serve_app(app, handler_cancellation=True)
        self.url = url + "/v1"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _record(self, request: web.Request) -> dict[str, Any]:
        body = await request.json()
        self.seen.append(Seen(request.path, dict(request.headers), body))
        # Gateway glob "fake-*" passes names through: "fake-cut" plays "cut".
        return {**body, "model": str(body.get("model", "")).removeprefix("fake-")}

    @staticmethod
    def _error(model: str) -> web.Response | None:
        if not model.startswith("error-"):
            return None
        status = int(model.split("-")[1])
        headers = {"retry-after": "7"} if status == 429 else {}
        body = {
            "error": {
                "message": f"fake provider error {status}",
                "type": "fake_error",
                "param": None,
                "code": f"fake_{status}",
            }
        }
        return web.json_response(body, status=status, headers=headers)

    async def _special(self, model: str) -> web.Response | None:
        if model == "hang":
            await asyncio.sleep(3600)  # the behaviour: a provider that never answers
        if model == "garbage":
            return web.Response(text="<html>oops</html>", content_type="text/html")
        return self._error(model)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        model = body["model"]
        special = await self._special(model)
        if special is not None:
            return special
        if body.get("stream"):
            return await self._chat_stream(request, body)
        resp: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "logprobs": None,
                    "message": {"role": "assistant", "content": "".join(WORDS), "refusal": None},
                }
            ],
        }
        self._add_usage(resp, model)
        return web.json_response(resp)

    @staticmethod
    def _add_usage(resp: dict[str, Any], model: str) -> None:
        if model == "usage-none":
            return
        if model == "usage-zero":
            resp["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        else:
            resp["usage"] = dict(FAKE_USAGE)

    async def _chat_stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        model = body["model"]
        base = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_fake",
        }
        try:
            async with sse_response(
                request, sep="\n", ping_interval=3600, allow_all_methods=True
            ) as sse:

                async def send(choices: list[Any], **extra: Any) -> None:
                    await sse.send(orjson.dumps({**base, "choices": choices, **extra}).decode())

                await send(
                    [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
                for i, word in enumerate(WORDS):
                    if model == "heartbeat":
                        await sse.write(b": ping\n\n")
                    await send(
                        [
                            {
                                "index": 0,
                                "delta": {"content": word},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
                    if model == "held" and i == 0:
                        await self.release.wait()
                    if model == "cut" and i == 1:
                        request.transport.close()  # type: ignore[union-attr]
                        return sse
                await send([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}])
                opts = body.get("stream_options") or {}
                if opts.get("include_usage") and model != "usage-none":
                    usage: dict[str, Any] = {}
                    self._add_usage(usage, model)
                    await send([], usage=usage["usage"])
                await sse.send("[DONE]")
                return sse
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnected.set()
            raise

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's Responses API (``tests.fakes_responses``)."""
        body = await self._record(request)
        special = await self._special(body["model"])
        return special if special is not None else await fakes_responses.serve(request, body)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        model = body["model"]
        special = await self._special(model)
        if special is not None:
            return special
        resp: dict[str, Any] = {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": 0, "text": "".join(WORDS), "logprobs": None, "finish_reason": "stop"}
            ],
        }
        self._add_usage(resp, model)
        return web.json_response(resp)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        raw = body["input"]
        inputs = [raw] if isinstance(raw, str) else raw
        vec = [0.25, -0.5, 0.75]
        data = []
        for i, _ in enumerate(inputs):
            emb: Any = vec
            if body.get("encoding_format") == "base64":
                emb = base64.b64encode(struct.pack("<3f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": 5, "total_tokens": 5},
            }
        )
