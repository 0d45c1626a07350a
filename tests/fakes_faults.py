"""A fault-injecting fake provider, for the forward stage's tests (never shipped).

``FaultyOpenAI`` is ``FakeOpenAI`` plus faults. The fault of a request is, by
precedence: the ``force`` attribute (flip a whole provider bad and good
again), the ``x-fake-fault`` request header (put it in a provider's
``headers:`` so two providers on one fake behave differently), else the
model name (``fake-`` prefix removed, as in ``FakeOpenAI``).

``<fault>-once``      the fault on the first request for that name, then normal answers
``error-<status>``    that status with an OpenAI error body (``FakeOpenAI``'s; 429 has
                      ``retry-after: 7``)
``ratelimit``         429 with ``retry-after-ms: <retry_after_ms>``
``reset``             the connection is closed before any response
``stall-first-byte``  no response at all (the headers never come)
``stall-first-event`` stream: 200 and SSE headers, then nothing
``held``              stream: one chunk, then nothing until ``release`` (``FakeOpenAI``'s)
``cut``               stream: the connection drops after two chunks (``FakeOpenAI``'s)
``truncated``         stream: two chunks, then a clean end without finish or ``[DONE]``
``drip``              stream: every event ``drip_s`` apart
``no-done``           stream: the whole answer (finish, usage when asked), then a clean
                      end without ``[DONE]``
``usage-nul``         usage whose ``prompt_tokens_details`` has a key with a NUL in it
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.fakes import FAKE_USAGE, WORDS, FakeOpenAI

_STREAM_FAULTS = ("stall-first-event", "truncated", "drip", "no-done", "late-first-event")


@dataclass
class FaultyOpenAI(FakeOpenAI):
    force: str | None = None
    retry_after_ms: int = 200
    drip_s: float = 0.05
    late_s: float = 0.8  # "late": the headers after this; "late-first-event": the first event
    counts: Counter[str] = field(default_factory=Counter)

    async def _record(self, request: web.Request) -> dict[str, Any]:
        body = await super()._record(request)
        fault = self.force or request.headers.get("x-fake-fault") or body["model"]
        self.counts[fault] += 1
        if fault.endswith("-once"):
            fault = fault.removesuffix("-once") if self.counts[fault] == 1 else "ok"
        return {**body, "model": fault}

    async def _special(self, model: str) -> web.Response | None:
        if model == "ratelimit":
            body = {"error": {"message": "slow down", "type": "requests", "code": "rate_limit"}}
            headers = {"retry-after-ms": str(self.retry_after_ms)}
            return web.json_response(body, status=429, headers=headers)
        # Sleeps in the fakes are the behaviour under test (a provider's delay).
        if model == "stall-first-byte":
            await asyncio.sleep(3600)
        if model == "late":
            await asyncio.sleep(self.late_s)
        return await super()._special(model)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        if body["model"] == "reset":
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(3600)  # cancelled: the connection is gone
        special = await self._special(body["model"])
        if special is not None:
            return special
        if body.get("stream") and body["model"] in _STREAM_FAULTS:
            return await self._faulty_stream(request, body)
        if body.get("stream"):
            return await self._chat_stream(request, body)
        return web.json_response(_completion(body["model"]))

    async def _faulty_stream(
        self, request: web.Request, body: dict[str, Any]
    ) -> web.StreamResponse:
        fault = body["model"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if fault == "stall-first-event":  # the behaviour: headers, then silence
            await asyncio.sleep(3600)
        if fault == "late-first-event":
            await asyncio.sleep(self.late_s)
        for i, event in enumerate(_events(fault, body)):
            if fault == "truncated" and i == 3:
                break  # a clean end of body, with no finish chunk and no [DONE]
            if fault == "no-done" and event.startswith(b"data: [DONE]"):
                break
            await resp.write(event)
            if fault == "drip":  # the behaviour: a slow, steady stream
                await asyncio.sleep(self.drip_s)
        await resp.write_eof()
        return resp


def _completion(model: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": "".join(WORDS), "refusal": None}
    answer: dict[str, Any] = {
        "id": "chatcmpl-faulty",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None, "message": message}],
        "usage": dict(FAKE_USAGE),
    }
    if model == "usage-nul":
        answer["usage"]["prompt_tokens_details"] = {"cached_tokens": 2, "odd\u0000key": 3}
    return answer


def _events(model: str, body: dict[str, Any]) -> list[bytes]:
    base = {"id": "chatcmpl-faulty", "object": "chat.completion.chunk", "model": model}

    def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = {**base, "choices": [choice] if delta or finish else [], **extra}
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    out = [event({"role": "assistant", "content": ""})]
    out += [event({"content": w}) for w in WORDS]
    out.append(event({}, "stop"))
    if (body.get("stream_options") or {}).get("include_usage"):
        out.append(event({}, usage=dict(FAKE_USAGE)))
    return [*out, b"data: [DONE]\n\n"]
