"""``kind: anthropic`` — Anthropic's Messages API (``POST /v1/messages``).

Contract: OpenAI chat bodies are translated to Messages bodies
(``anthropic_translate``); ``max_tokens``, which Anthropic requires, defaults to
the provider's ``default_max_tokens``. Auth is the ``x-api-key`` header and
``anthropic-version`` is the provider's ``api_version`` (default
``2023-06-01``); no client header is forwarded. Legacy ``/v1/completions``
sends the prompt as one user message and answers in ``text_completion``
shape; embeddings and moderations are a 400 (Anthropic has neither).

Usage is exactly what Anthropic reports — ``input_tokens`` plus cache reads
and writes as prompt tokens, ``output_tokens`` as completion tokens, the cache
split in the details — taken from ``message_start`` and the last
``message_delta`` of a stream (cumulative figures, never summed). When
Anthropic reports nothing, the relay estimates with tiktoken.

Errors: HTTP errors keep their status except 529 ``overloaded_error``, which
becomes 503; an ``error`` event mid-stream raises ``UpstreamStreamBroken``.
Cancellation: ``aclose()`` closes the upstream connection, which stops
Anthropic's generation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from proxy.config.model import ProviderConfig
from proxy.core.errors import (
    GatewayError,
    InvalidRequest,
    ProviderHTTPError,
    UpstreamStreamBroken,
)
from proxy.core.sse import DONE, data_event, event_data
from proxy.core.usage import Usage, usage_from_openai
from proxy.providers import http, native
from proxy.providers.anthropic_translate import (
    Json,
    finish_reason,
    from_anthropic,
    to_anthropic,
    usage_json,
)
from proxy.providers.base import Call, Reply, UpstreamStream
from proxy.providers.pool import Pool
from proxy.providers.translated import (
    TranslatingProvider,
    chat_id,
    error_object,
)

DEFAULT_VERSION = "2023-06-01"
# Anthropic error type -> (OpenAI error type, code); others are the client's fault.
_ERROR_KINDS = {
    "rate_limit_error": ("requests", "rate_limit_exceeded"),
    "overloaded_error": ("server_error", "overloaded"),
    "api_error": ("server_error", "api_error"),
    "timeout_error": ("server_error", "timeout"),
}


PING = b": ping\n\n"


class AnthropicStreamTranslator:
    """Feed Anthropic SSE events in order; get OpenAI SSE events back.

    Every chunk carries the same id and ``created``. Text deltas become
    ``content`` deltas, each ``tool_use`` block one tool call whose
    ``input_json_delta`` pieces become ``arguments`` deltas; ``message_stop``
    emits the finish chunk, the usage chunk (``choices: []``) and ``[DONE]``.
    An ``error`` event raises ``UpstreamStreamBroken``.
    """

    def __init__(self, *, chat_id: str, model: str, created: int, endpoint: str) -> None:
        self.chat_id = chat_id
        self.model = model
        self.created = created
        self.chat = endpoint != "completions"
        self.done = False
        self._tools: dict[int, int] = {}  # content block index -> tool_calls index
        self._usage: Json = {}
        self._stop_reason: Any = None

    def feed(self, event: bytes) -> list[bytes]:
        data = event_data(event)
        if data is None:
            return []
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamStreamBroken("Anthropic sent a stream event that is not JSON.") from None
        handler = _HANDLERS.get(obj.get("type")) if isinstance(obj, dict) else None
        return handler(self, obj) if handler is not None else []

    def end(self) -> list[bytes]:
        if not self.done:
            raise UpstreamStreamBroken("Anthropic ended the stream before message_stop.")
        return []

    def _chunk(self, choices: list[Json], **extra: Any) -> bytes:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        obj = {"id": self.chat_id, "object": kind, "created": self.created, "model": self.model}
        return data_event({**obj, "choices": choices, **extra})

    def _delta(self, delta: Json, finish: str | None = None) -> bytes:
        if self.chat:
            return self._chunk(
                [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            )
        text = delta.get("content") or ""
        return self._chunk([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}])

    def _message_start(self, obj: Json) -> list[bytes]:
        msg = obj.get("message") or {}
        self.model = msg.get("model") or self.model
        usage = msg.get("usage")
        if isinstance(usage, dict):
            self._usage = dict(usage)
        return [self._delta({"role": "assistant", "content": ""})] if self.chat else []

    def _block_start(self, obj: Json) -> list[bytes]:
        block = obj.get("content_block") or {}
        if block.get("type") == "text" and block.get("text"):
            return [self._delta({"content": block["text"]})]
        if block.get("type") != "tool_use" or not self.chat:
            return []
        index = self._tools[obj.get("index", -1)] = len(self._tools)
        fn = {"name": block.get("name"), "arguments": ""}
        call = {"index": index, "id": block.get("id"), "type": "function", "function": fn}
        return [self._delta({"tool_calls": [call]})]

    def _block_delta(self, obj: Json) -> list[bytes]:
        delta = obj.get("delta") or {}
        if delta.get("type") == "text_delta" and delta.get("text"):
            return [self._delta({"content": delta["text"]})]
        index = self._tools.get(obj.get("index", -1))
        partial = delta.get("partial_json")
        if delta.get("type") == "input_json_delta" and index is not None and partial:
            call = {"index": index, "function": {"arguments": partial}}
            return [self._delta({"tool_calls": [call]})]
        return []

    def _message_delta(self, obj: Json) -> list[bytes]:
        delta = obj.get("delta") or {}
        if delta.get("stop_reason"):
            self._stop_reason = delta["stop_reason"]
        usage = obj.get("usage")
        if isinstance(usage, dict):  # cumulative figures: replace, never add
            self._usage.update({k: v for k, v in usage.items() if isinstance(v, int)})
        return []

    def _message_stop(self, obj: Json) -> list[bytes]:
        self.done = True
        endpoint = "chat" if self.chat else "completions"
        out = [self._delta({}, finish_reason(self._stop_reason, endpoint))]
        usage = usage_json(self._usage) if self._usage else None
        if usage is not None:
            out.append(self._chunk([], usage=usage))
        out.append(DONE)
        return out

    def _ping(self, obj: Json) -> list[bytes]:
        return [PING]

    def _error(self, obj: Json) -> list[bytes]:
        err = obj.get("error")
        err = err if isinstance(err, dict) else {}
        kind = err.get("type") or "error"
        message = err.get("message") or "no message"
        raise UpstreamStreamBroken(f"Anthropic reported {kind} mid-stream: {message}")


_Handler = Callable[[AnthropicStreamTranslator, Json], list[bytes]]
_HANDLERS: dict[Any, _Handler] = {
    "message_start": AnthropicStreamTranslator._message_start,
    "content_block_start": AnthropicStreamTranslator._block_start,
    "content_block_delta": AnthropicStreamTranslator._block_delta,
    "message_delta": AnthropicStreamTranslator._message_delta,
    "message_stop": AnthropicStreamTranslator._message_stop,
    "ping": AnthropicStreamTranslator._ping,
    "error": AnthropicStreamTranslator._error,
}


def anthropic_error(
    status: int, body: bytes, headers: Mapping[str, str], cfg: ProviderConfig
) -> GatewayError:
    """An Anthropic error response in OpenAI's shape; 529 overloaded becomes 503."""
    try:
        err = error_object(orjson.loads(body))
    except orjson.JSONDecodeError:
        err = {}
    kind = err.get("type")
    kind = kind if isinstance(kind, str) else "api_error"
    message = err.get("message") or f"provider '{cfg.name}' returned HTTP {status}"
    default = ("server_error", kind) if status >= 500 else ("invalid_request_error", kind)
    err_type, code = _ERROR_KINDS.get(kind, default)
    error = {"message": message, "type": err_type, "code": code}
    return ProviderHTTPError(
        503 if status == 529 else status, error, headers=http.passed_headers(headers)
    )


def native_usage(usage: Any) -> Usage | None:
    """An Anthropic ``usage`` object as the gateway's (cache reads and writes
    are prompt tokens, split out in the details)."""
    return usage_from_openai(usage_json(usage))


def messages_url(base_url: str) -> str:
    # Both "https://api.anthropic.com" and ".../v1" are common in configs.
    return base_url + ("/messages" if base_url.endswith("/v1") else "/v1/messages")


class AnthropicProvider(TranslatingProvider):
    translator = AnthropicStreamTranslator

    def __init__(self, config: ProviderConfig, client: Pool) -> None:
        version = {"anthropic-version": config.api_version or DEFAULT_VERSION}
        super().__init__(config, client, version, key_header="x-api-key")
        self._url = messages_url(config.base_url)

    def url(self, call: Call) -> str:
        return self._url

    def payload(self, call: Call) -> bytes:
        if call.endpoint in ("embeddings", "moderations"):
            raise InvalidRequest(
                f"Provider '{self.name}' (Anthropic) has no {call.endpoint} API; "
                f"route {call.endpoint} models to another provider.",
                param="model",
                code=f"{call.endpoint}_not_supported",
            )
        cfg = self.config
        body = to_anthropic(
            call.body, call.endpoint, call.model, call.stream, cfg.default_max_tokens
        )
        return orjson.dumps(body)

    def error(self, status: int, body: bytes, headers: Mapping[str, str]) -> GatewayError:
        return anthropic_error(status, body, headers, self.config)

    async def complete(self, call: Call) -> Reply:
        out = from_anthropic(
            await self.answer(call),
            chat_id=chat_id(call),
            created=int(time.time()),
            model=call.model,
            endpoint=call.endpoint,
        )
        return Reply(body=orjson.dumps(out), usage=usage_from_openai(out.get("usage")))

    # The Messages front door, passed through (``proxy.providers.native``).

    def speaks(self, api: str) -> bool:
        return api == "messages"

    async def native_complete(self, call: Call) -> Reply:
        resp = await native.send(
            self._client, self.config, self._url, self._headers, call, self.error
        )
        return await native.reply(resp, self.config, call, native_usage)

    async def native_stream(self, call: Call) -> UpstreamStream:
        resp = await native.send(
            self._client, self.config, self._url, self._headers, call, self.error
        )
        return native.NativeStream(resp, self.config, call.timeouts)
