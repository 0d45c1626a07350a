"""A fake OpenAI upstream whose models behave like OpenAI's families.

Real aiohttp server on 127.0.0.1, port 0. Reasoning models (``o1``/``o3``/
``o4``/``gpt-5`` names) refuse ``max_tokens`` exactly as OpenAI does (400
``unsupported_parameter``); ``cached-reasoner`` reports cached prompt and
reasoning tokens in OpenAI's usage details; ``error-503`` fails. Every request
body is kept in ``seen`` (model name, body).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.loopback import serve_app

REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")
PLAIN_USAGE = {"prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17}
DETAILED_USAGE = {
    "prompt_tokens": 1000,
    "completion_tokens": 500,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 800},
    "completion_tokens_details": {"reasoning_tokens": 300},
}


def unsupported_max_tokens() -> web.Response:
    """OpenAI's answer to ``max_tokens`` on an o-series or GPT-5 model."""
    error = {
        "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
        "Use 'max_completion_tokens' instead.",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "unsupported_parameter",
    }
    return web.json_response({"error": error}, status=400)


@dataclass
class FakeModels:
    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> FakeModels:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner, url = await serve_app(app)
        self.url = url + "/v1"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def models(self) -> list[str]:
        return [m for m, _ in self.seen]

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        model = str(body.get("model"))
        self.seen.append((model, body))
        if model == "error-503":
            err = {"message": "overloaded", "type": "server_error", "param": None, "code": None}
            return web.json_response({"error": err}, status=503)
        if model.startswith(REASONING_PREFIXES) and "max_tokens" in body:
            return unsupported_max_tokens()
        usage = DETAILED_USAGE if model == "cached-reasoner" else PLAIN_USAGE
        return web.json_response(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "logprobs": None,
                        "message": {"role": "assistant", "content": "ok", "refusal": None},
                    }
                ],
                "usage": usage,
            }
        )
