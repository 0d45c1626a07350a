"""``kind: echo`` — a built-in local provider so the demo runs with no keys.

It answers with the last user message (chat), the prompt (completions), a
hashed character-trigram vector (embeddings) or a moderation verdict that
flags ``violence`` in any text holding the demo word ``kaboom`` and nothing
else (moderations), in OpenAI's exact shapes. Streams
are split at tiktoken token boundaries, a few tokens per chunk, like a real
model, and end with a usage chunk. Usage is exact tiktoken counts of the
prompt and the answer, reported as the provider's.
"""

from __future__ import annotations

import base64
import math
import struct
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import orjson

from proxy.core import tokens
from proxy.core.sse import DONE, data_event
from proxy.core.usage import Usage
from proxy.providers import moderation
from proxy.providers.base import Call, Provider, Reply, UpstreamStream

_TOKENS_PER_CHUNK = 3
DEFAULT_DIMENSIONS = 256
DEMO_FLAGGED = "kaboom"  # the word echo's moderation flags, for the demo and tests


def _last_user_text(messages: list[Any]) -> str:
    for msg in reversed(messages):
        if isinstance(msg, dict) and msg.get("role") == "user":
            return tokens._content_text(msg.get("content"))
    return ""


def _answer(call: Call) -> str:
    if call.endpoint == "chat":
        return _last_user_text(call.body.get("messages") or [])
    prompt = call.body.get("prompt")
    return prompt if isinstance(prompt, str) else ""


def _vector(text: str, dims: int) -> list[float]:
    """A hashed bag of character trigrams (signed feature hashing), unit
    length: texts that differ by a few edits share most trigrams and land
    close by cosine similarity, unrelated ones near 0 (case, punctuation and
    spacing are ignored). It stands in for a
    real embedding model in the demo's semantic cache; stable across
    processes (crc32, not ``hash``)."""
    words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
    norm_text = " " + " ".join(words) + " "
    raw = [0.0] * dims
    for i in range(len(norm_text) - 2):
        h = zlib.crc32(norm_text[i : i + 3].encode())
        raw[h % dims] += 1.0 if h & 0x80000000 else -1.0
    norm = math.sqrt(sum(x * x for x in raw))
    if not norm:  # empty input: any fixed unit vector
        return [1.0] + [0.0] * (dims - 1)
    return [x / norm for x in raw]


def _usage(call: Call, answer: str) -> Usage:
    return Usage(
        prompt_tokens=tokens.count_prompt(call.body, call.endpoint, call.model),
        completion_tokens=tokens.count_text(answer, call.model),
        source="provider",
    )


def _usage_json(u: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }


class EchoStream(UpstreamStream):
    def __init__(self, call: Call) -> None:
        self._call = call
        self.headers = {}

    async def __aiter__(self) -> AsyncIterator[bytes]:  # type: ignore[override]
        call = self._call
        answer = _answer(call)
        chat = call.endpoint == "chat"
        base: dict[str, Any] = {
            "id": ("chatcmpl-" if chat else "cmpl-") + call.request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": call.model,
        }
        if chat:
            yield data_event(
                {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
        enc = tokens.encoding_for(call.model)
        ids = enc.encode(answer, disallowed_special=())
        for i in range(0, len(ids), _TOKENS_PER_CHUNK):
            piece = enc.decode(ids[i : i + _TOKENS_PER_CHUNK])
            choice: dict[str, Any] = (
                {"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}
                if chat
                else {"index": 0, "text": piece, "logprobs": None, "finish_reason": None}
            )
            yield data_event({**base, "choices": [choice]})
        last: dict[str, Any] = (
            {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
            if chat
            else {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}
        )
        yield data_event({**base, "choices": [last]})
        yield data_event({**base, "choices": [], "usage": _usage_json(_usage(call, answer))})
        yield DONE

    async def aclose(self) -> None:
        return None


class EchoProvider(Provider):
    async def complete(self, call: Call) -> Reply:
        if call.endpoint == "embeddings":
            return self._embed(call)
        if call.endpoint == "moderations":
            return self._moderate(call)
        answer = _answer(call)
        usage = _usage(call, answer)
        now = int(time.time())
        if call.endpoint == "chat":
            body: dict[str, Any] = {
                "id": "chatcmpl-" + call.request_id,
                "object": "chat.completion",
                "created": now,
                "model": call.model,
                "choices": [
                    {
                        "index": 0,
                        "logprobs": None,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": answer, "refusal": None},
                    }
                ],
            }
        else:
            body = {
                "id": "cmpl-" + call.request_id,
                "object": "text_completion",
                "created": now,
                "model": call.model,
                "choices": [
                    {"index": 0, "text": answer, "logprobs": None, "finish_reason": "stop"}
                ],
            }
        body["usage"] = _usage_json(usage)
        return Reply(body=orjson.dumps(body), usage=usage)

    def _embed(self, call: Call) -> Reply:
        raw = call.body.get("input")
        inputs = (
            [raw]
            if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int))
            else list(raw or [])
        )
        dims = call.body.get("dimensions") or DEFAULT_DIMENSIONS
        as_b64 = call.body.get("encoding_format") == "base64"
        data = []
        for i, item in enumerate(inputs):
            vec = _vector(str(item), int(dims))
            emb: Any = (
                base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if as_b64 else vec
            )
            data.append({"object": "embedding", "index": i, "embedding": emb})
        prompt = tokens.count_prompt(call.body, "embeddings", call.model)
        usage = Usage(prompt_tokens=prompt, completion_tokens=0, source="provider")
        body = {
            "object": "list",
            "data": data,
            "model": call.model,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }
        return Reply(body=orjson.dumps(body), usage=usage)

    def _moderate(self, call: Call) -> Reply:
        results = [
            moderation.result({"violence": 0.97} if DEMO_FLAGGED in text.lower() else {})
            for text in moderation.inputs(call.body)
        ]
        body = {"id": "modr-" + call.request_id, "model": call.model, "results": results}
        return Reply(body=orjson.dumps(body), usage=None)

    async def stream(self, call: Call) -> UpstreamStream:
        return EchoStream(call)
