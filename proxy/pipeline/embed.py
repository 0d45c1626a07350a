"""Embeddings for the gateway's own use (the semantic cache), through the
same route → forward path as a client's ``/v1/embeddings``: the model's
targets, retries, breakers and provider limits all apply, and the call is
settled as its own usage row (tagged ``tollway: semantic-cache``) so its
cost is never invisible.

It answers within ``timeout_s`` or raises: the caller treats any failure as
"no vector" (a cache miss), never as the request's failure.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time

import orjson

from proxy.core.errors import GatewayError, UpstreamTimeout
from proxy.core.record import Settler, UsageRecord
from proxy.pipeline.snapshot import ConfigStore
from proxy.providers.base import Call
from proxy.stages.forward.attempts import Upstreams, forward

TAGS: dict[str, object] = {"tollway": "semantic-cache"}


class EmbeddingFailed(Exception):
    """The provider's answer held no usable vector."""


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


class InternalEmbedder:
    def __init__(self, config: ConfigStore, upstreams: Upstreams, settler: Settler) -> None:
        self.config, self.upstreams, self.settler = config, upstreams, settler

    async def embed(
        self, model: str, text: str, parent: UsageRecord, bill_tenant: bool, timeout_s: float
    ) -> list[float]:
        snapshot = self.config.current
        record = UsageRecord(parent.request_id, "embeddings", model, config=snapshot.config)
        record.tags = TAGS
        if bill_tenant:
            record.tenant, record.tenant_id = parent.tenant, parent.tenant_id
            record.key_id, record.key_prefix = parent.key_id, parent.key_prefix
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                plan = snapshot.router.plan(model, {})
                body = {"model": model, "input": text}
                call = Call("embeddings", body, model, False, record.request_id)
                done = await forward(self.upstreams, snapshot, plan, call, record)
            record.provider, record.provider_model = done.target.provider.name, done.target.model
            record.served_model, record.attempts = done.target.public, done.attempts
            assert done.reply is not None
            if done.reply.usage is not None:
                record.usage = done.reply.usage
            return vector_of(done.reply.body)
        except GatewayError as exc:
            record.fail(exc)
            raise
        except TimeoutError:
            record.fail(UpstreamTimeout("The embedding call timed out."))
            raise
        except EmbeddingFailed:
            record.status, record.error_code = 502, "bad_embedding"
            raise
        finally:
            record.latency_ms = (time.perf_counter() - started) * 1000
            self.settler.settle(record)
