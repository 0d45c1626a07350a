"""``kind: anthropic`` — Anthropic's Messages API (``POST /v1/messages``).

Contract: OpenAI chat bodies are translated to Messages bodies
(``anthropic_translate``); ``max_tokens``, which Anthropic requires, defaults to
the provider's ``default_max_tokens``. Auth is the ``x-api-key`` header and
``anthropic-version`` is the provider's ``api_version`` (default
``2023-06-01``); no client header is forwarded. Legacy ``/v1/completions``
sends the prompt as one user message and answers in ``text_completion``
shape; embeddings are a 400 (Anthropic has none).

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
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any, Protocol

import aiohttp
import orjson

from proxy.config import ProviderConfig
from proxy.errors import (
    GatewayError,
    InvalidRequest,
    ProviderHTTPError,
    UpstreamStreamBroken,
    UpstreamUnavailable,
)
from proxy.providers import http
from proxy.providers.anthropic_translate import (
    Json,
    finish_reason,
    from_anthropic,
    to_anthropic,
    usage_json,
)
from proxy.providers.base import Call, Provider, Reply, UpstreamStream
from proxy.sse import DONE, IncompleteEvent, data_event, event_data, iter_events
from proxy.usage import usage_from_openai

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


class Translator(Protocol):
    def feed(self, event: bytes) -> list[bytes]: ...

    def end(self) -> list[bytes]: ...


async def _whole_crlf(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    # iter_events normalises CRLF per chunk; a "\r" at a chunk's end would
    # lose its "\n" to the next chunk, so it is held back until then.
    held = b""
    async for chunk in chunks:
        chunk, held = held + chunk, b""
        if chunk.endswith(b"\r"):
            chunk, held = chunk[:-1], b"\r"
        if chunk:
            yield chunk
    if held:
        yield held


async def translate_stream(
    chunks: AsyncIterable[bytes], translator: Translator, name: str
) -> AsyncIterator[bytes]:
    """Provider body bytes in, whole OpenAI SSE events out, one at a time.
    Not Anthropic-specific: the Gemini adapter uses it too."""
    try:
        async for event in iter_events(_whole_crlf(chunks)):
            for out in translator.feed(event):
                yield out
    except IncompleteEvent:
        raise UpstreamStreamBroken(f"provider '{name}' ended the stream mid-event") from None
    for out in translator.end():
        yield out


class TranslatedStream(UpstreamStream):
    """An upstream response read through a stream translator (Anthropic's, Gemini's)."""

    def __init__(
        self, resp: aiohttp.ClientResponse, cfg: ProviderConfig, translator: Translator
    ) -> None:
        self._resp = resp
        self._cfg = cfg
        self._translator = translator
        self.headers = {}

    async def __aiter__(self) -> AsyncIterator[bytes]:  # type: ignore[override]
        body = http.iter_body(self._resp, self._cfg)
        async for event in translate_stream(body, self._translator, self._cfg.name):
            yield event

    async def aclose(self) -> None:
        self._resp.close()


def _error_object(body: bytes) -> dict[str, Any]:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    err = parsed.get("error") if isinstance(parsed, dict) else None
    return err if isinstance(err, dict) else {}


def anthropic_error(status: int, body: bytes, headers: Any, cfg: ProviderConfig) -> GatewayError:
    """An Anthropic error response in OpenAI's shape; 529 overloaded becomes 503."""
    err = _error_object(body)
    kind = err.get("type")
    kind = kind if isinstance(kind, str) else "api_error"
    message = err.get("message") or f"provider '{cfg.name}' returned HTTP {status}"
    default = ("server_error", kind) if status >= 500 else ("invalid_request_error", kind)
    err_type, code = _ERROR_KINDS.get(kind, default)
    passed = {h: headers[h] for h in http.PASSED_ERROR_HEADERS if h in headers}
    error = {"message": message, "type": err_type, "code": code}
    return ProviderHTTPError(503 if status == 529 else status, error, headers=passed)


def messages_url(base_url: str) -> str:
    # Both "https://api.anthropic.com" and ".../v1" are common in configs.
    return base_url + ("/messages" if base_url.endswith("/v1") else "/v1/messages")


class AnthropicProvider(Provider):
    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession) -> None:
        super().__init__(config)
        self._session = session
        self._url = messages_url(config.base_url)
        self._headers = {
            "Content-Type": "application/json",
            "anthropic-version": config.api_version or DEFAULT_VERSION,
            **config.headers,
        }
        if config.api_key:
            self._headers["x-api-key"] = config.api_key

    def payload(self, call: Call) -> bytes:
        if call.endpoint == "embeddings":
            raise InvalidRequest(
                f"Provider '{self.name}' (Anthropic) has no embeddings API; "
                "route embedding models to another provider.",
                param="model",
                code="embeddings_not_supported",
            )
        cfg = self.config
        body = to_anthropic(
            call.body, call.endpoint, call.model, call.stream, cfg.default_max_tokens
        )
        return orjson.dumps(body)

    async def _send(self, call: Call) -> aiohttp.ClientResponse:
        payload = self.payload(call)
        headers = {**self._headers, "X-Request-Id": call.request_id}
        resp = await http.post(
            self._session, self.config, self._url, payload, headers, call.timeouts
        )
        if resp.status >= 400:
            body = await http.read_body(resp, self.config, call.timeouts)
            raise anthropic_error(resp.status, body, resp.headers, self.config)
        return resp

    async def complete(self, call: Call) -> Reply:
        resp = await self._send(call)
        raw = await http.read_body(resp, self.config, call.timeouts)
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            msg = None
        if not isinstance(msg, dict):
            raise UpstreamUnavailable(
                f"provider '{self.name}' returned a response that is not a JSON object"
            )
        out = from_anthropic(
            msg,
            chat_id=chat_id(call),
            created=int(time.time()),
            model=call.model,
            endpoint=call.endpoint,
        )
        return Reply(body=orjson.dumps(out), usage=usage_from_openai(out.get("usage")))

    async def stream(self, call: Call) -> UpstreamStream:
        resp = await self._send(call)
        translator = AnthropicStreamTranslator(
            chat_id=chat_id(call),
            model=call.model,
            created=int(time.time()),
            endpoint=call.endpoint,
        )
        return TranslatedStream(resp, self.config, translator)


def chat_id(call: Call) -> str:
    """The response id: tied to the gateway's request id, like the echo provider's."""
    return ("chatcmpl-" if call.endpoint == "chat" else "cmpl-") + call.request_id
