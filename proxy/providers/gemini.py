"""``kind: gemini`` — Google's Gemini API (``models/{model}:generateContent``,
``:streamGenerateContent?alt=sse``, ``:batchEmbedContents``).

Contract: OpenAI bodies are translated by ``gemini_translate`` (roles,
system instruction, generation config, function declarations and calls).
The key travels in the ``x-goog-api-key`` header, never in the URL, so it
cannot leak into access logs. ``base_url`` may name the API version
(``https://generativelanguage.googleapis.com/v1beta``) or not, in which case
``api_version`` (default ``v1beta``) is appended. Legacy ``/v1/completions``
sends the prompt as one user message and answers in ``text_completion``
shape. Safety blocks, of the prompt or of an answer, end with
``finish_reason: content_filter``.

Usage is exactly what Gemini reports in ``usageMetadata`` (the last one of a
stream: its figures are running totals), thoughts counted as completion
tokens and kept in the details. Embeddings carry no usage from Gemini, so
their usage is a tiktoken estimate, marked ``estimated``.

Errors keep their HTTP status in OpenAI's shape; an error object mid-stream,
or a stream that ends before every answer has a ``finishReason``, raises
``UpstreamStreamBroken``. Cancellation: ``aclose()`` closes the upstream
connection, which stops Gemini's generation.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson

from proxy.config.model import ProviderConfig
from proxy.core import tokens
from proxy.core.errors import (
    GatewayError,
    InvalidRequest,
    ProviderHTTPError,
    UpstreamStreamBroken,
)
from proxy.core.sse import DONE, data_event, event_data
from proxy.core.usage import usage_from_openai
from proxy.providers import http, paths
from proxy.providers.base import Call, Reply
from proxy.providers.gemini_translate import (
    Json,
    call_id,
    candidate_parts,
    finish_reason,
    from_gemini,
    from_gemini_embed,
    to_gemini,
    to_gemini_embed,
    tool_call,
    usage_json,
)
from proxy.providers.pool import Pool
from proxy.providers.translated import TranslatingProvider, chat_id, error_object

DEFAULT_VERSION = "v1beta"
# gRPC status -> (OpenAI error type, code); others by HTTP status.
_STATUS_KINDS: dict[str, tuple[str, str | None]] = {
    "RESOURCE_EXHAUSTED": ("requests", "rate_limit_exceeded")
}


class GeminiStreamTranslator:
    """Feed Gemini SSE events (each a whole GenerateContentResponse); get
    OpenAI SSE events back.

    Each candidate is one choice: a role chunk when it first appears, a
    ``content`` chunk per text part, one whole tool call per ``functionCall``
    part, a finish chunk at its ``finishReason``. Gemini has no end marker,
    so ``end()`` emits the usage chunk and ``[DONE]`` once the body is over.
    """

    def __init__(self, *, chat_id: str, model: str, created: int, endpoint: str) -> None:
        self.chat_id = chat_id
        self.model = model
        self.created = created
        self.endpoint = endpoint
        self.chat = endpoint != "completions"
        self._started: set[int] = set()
        self._finished: set[int] = set()
        self._calls: dict[int, int] = {}  # choice index -> tool calls so far
        self._usage: Any = None

    def feed(self, event: bytes) -> list[bytes]:
        data = event_data(event)
        if data is None:
            return []
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            raise UpstreamStreamBroken("Gemini sent a stream event that is not a JSON object.")
        if isinstance(obj.get("error"), dict):
            err = obj["error"]
            raise UpstreamStreamBroken(
                f"Gemini reported {err.get('status') or 'an error'} mid-stream: "
                f"{err.get('message') or 'no message'}"
            )
        self.model = obj.get("modelVersion") or self.model
        if isinstance(obj.get("usageMetadata"), dict):
            self._usage = obj["usageMetadata"]  # running totals: the last one wins
        cands = [c for c in obj.get("candidates") or () if isinstance(c, dict)]
        if not cands and (obj.get("promptFeedback") or {}).get("blockReason"):
            cands = [{"finishReason": "SAFETY"}]  # the prompt itself was blocked
        return [out for i, c in enumerate(cands) for out in self._candidate(c, c.get("index", i))]

    def end(self) -> list[bytes]:
        if not self._finished or self._started - self._finished:
            raise UpstreamStreamBroken("Gemini ended the stream before its finishReason.")
        usage = usage_json(self._usage)
        return [self._chunk([], usage=usage), DONE] if usage else [DONE]

    def _candidate(self, cand: Json, index: int) -> list[bytes]:
        out = []
        if index not in self._started:
            self._started.add(index)
            if self.chat:
                out.append(self._delta(index, {"role": "assistant", "content": ""}))
        for part in candidate_parts(cand):
            if isinstance(part.get("text"), str) and part["text"]:
                out.append(self._delta(index, {"content": part["text"]}))
            elif isinstance(part.get("functionCall"), dict) and self.chat:
                n = self._calls[index] = self._calls.get(index, -1) + 1
                call = {"index": n, **tool_call(part, call_id(self.chat_id, index, n))}
                out.append(self._delta(index, {"tool_calls": [call]}))
        reason = cand.get("finishReason")
        if reason and index not in self._finished:
            self._finished.add(index)
            finish = finish_reason(reason, index in self._calls, self.endpoint)
            out.append(self._delta(index, {}, finish))
        return out

    def _chunk(self, choices: list[Json], **extra: Any) -> bytes:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        obj = {"id": self.chat_id, "object": kind, "created": self.created, "model": self.model}
        return data_event({**obj, "choices": choices, **extra})

    def _delta(self, index: int, delta: Json, finish: str | None = None) -> bytes:
        choice: Json = {"index": index}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta.get("content") or ""
        return self._chunk([{**choice, "logprobs": None, "finish_reason": finish}])


def gemini_error(
    status: int, body: bytes, headers: Mapping[str, str], cfg: ProviderConfig
) -> GatewayError:
    """A Gemini error (``{"error": {"code", "message", "status"}}``) in OpenAI's shape."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, list) and parsed:  # streaming endpoints wrap it in a list
        parsed = parsed[0]
    err = error_object(parsed)
    grpc = err.get("status")
    grpc = grpc if isinstance(grpc, str) else ""
    message = err.get("message") or f"provider '{cfg.name}' returned HTTP {status}"
    kinds: tuple[str, str | None] = (
        "server_error" if status >= 500 else "invalid_request_error",
        grpc.lower() or None,
    )
    err_type, code = _STATUS_KINDS.get(grpc, kinds)
    error = {"message": message, "type": err_type, "code": code}
    return ProviderHTTPError(status, error, headers=http.passed_headers(headers))


def api_root(cfg: ProviderConfig) -> str:
    if urlsplit(cfg.base_url).path.strip("/"):
        return cfg.base_url
    return f"{cfg.base_url}/{cfg.api_version or DEFAULT_VERSION}"


class GeminiProvider(TranslatingProvider):
    translator = GeminiStreamTranslator

    def __init__(self, config: ProviderConfig, client: Pool) -> None:
        super().__init__(config, client, {}, key_header="x-goog-api-key")
        self._root = api_root(config)

    def url(self, call: Call) -> str:
        model = paths.segment(call.model.removeprefix("models/"))
        if call.endpoint == "embeddings":
            method = "batchEmbedContents"
        else:
            method = "streamGenerateContent?alt=sse" if call.stream else "generateContent"
        return f"{self._root}/models/{model}:{method}"

    def payload(self, call: Call) -> bytes:
        if call.endpoint == "moderations":
            raise InvalidRequest(
                f"Provider '{self.name}' (Gemini) has no moderations API; "
                "route moderation models to another provider.",
                param="model",
                code="moderations_not_supported",
            )
        if call.endpoint == "embeddings":
            return orjson.dumps(to_gemini_embed(call.body, call.model.removeprefix("models/")))
        return orjson.dumps(to_gemini(call.body, call.endpoint))

    def error(self, status: int, body: bytes, headers: Mapping[str, str]) -> GatewayError:
        return gemini_error(status, body, headers, self.config)

    async def complete(self, call: Call) -> Reply:
        obj = await self.answer(call)
        if call.endpoint == "embeddings":
            return self._embeddings(call, obj)
        created = int(time.time())
        out = from_gemini(
            obj, chat_id=chat_id(call), created=created, model=call.model, endpoint=call.endpoint
        )
        return Reply(body=orjson.dumps(out), usage=usage_from_openai(out.get("usage")))

    def _embeddings(self, call: Call, obj: Json) -> Reply:
        estimate = tokens.count_prompt(call.body, "embeddings", call.model)
        as_base64 = call.body.get("encoding_format") == "base64"
        out = from_gemini_embed(obj, model=call.model, as_base64=as_base64, prompt_tokens=estimate)
        # None lets the relay mark the tiktoken estimate as such.
        usage = usage_from_openai(out["usage"]) if "usageMetadata" in obj else None
        return Reply(body=orjson.dumps(out), usage=usage)
