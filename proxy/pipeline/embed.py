"""Embeddings for the gateway's own use (the semantic cache): an internal
call (``proxy.pipeline.internal``) to ``/v1/embeddings``, settled as its own
usage row tagged ``tollway: semantic-cache``.

It answers within ``timeout_s`` or raises: the caller treats any failure as
"no vector" (a cache miss), never as the request's failure.
"""

from __future__ import annotations

import base64
import struct

import orjson

from proxy.core.record import UsageRecord
from proxy.pipeline.internal import BadAnswer, InternalCaller, Purpose
from proxy.providers.base import Reply

PURPOSE = Purpose("embeddings", "semantic-cache")
TAGS = PURPOSE.tags


class EmbeddingFailed(BadAnswer):
    """The provider's answer held no usable vector."""

    code = "bad_embedding"


def vector_of(body: bytes) -> list[float]:
    """The first embedding of an OpenAI-shaped response (floats or base64)."""
    try:
        emb = orjson.loads(body)["data"][0]["embedding"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
        raise EmbeddingFailed("no embedding in the provider's answer") from exc
    if isinstance(emb, str):
        raw = base64.b64decode(emb)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    if not isinstance(emb, list) or not emb:
        raise EmbeddingFailed("an empty embedding")
    return [float(x) for x in emb]


class InternalEmbedder(InternalCaller):
    async def embed(
        self, model: str, text: str, parent: UsageRecord, bill_tenant: bool, timeout_s: float
    ) -> list[float]:
        # base64: a quarter of the JSON floats' bytes, decoded by one unpack
        # (providers that ignore it answer floats, read the same way).
        body = {"model": model, "input": text, "encoding_format": "base64"}
        return await self.call(PURPOSE, body, _read, parent, bill_tenant, timeout_s)


def _read(reply: Reply) -> list[float]:
    return vector_of(reply.body)
