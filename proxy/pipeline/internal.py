"""Requests the gateway makes for its own use (the semantic cache's
embeddings, the guardrails' moderation), through the same route → forward
path as a client's request: the model's targets, retries, breakers and
provider limits all apply, and each call is settled as its own usage row
(tagged ``tollway: <purpose>``) so its cost is never invisible.

A call answers within ``timeout_s`` or raises (a ``GatewayError``,
``TimeoutError``, or ``BadAnswer`` from ``read``); its row says which.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from proxy.core import metering
from proxy.core.errors import GatewayError, UpstreamTimeout
from proxy.core.record import Settler, UsageRecord
from proxy.pipeline.snapshot import ConfigStore
from proxy.providers.base import Call, Endpoint, Reply
from proxy.stages.forward.attempts import Upstreams, forward

T = TypeVar("T")


class BadAnswer(Exception):
    """The provider's answer held nothing usable; ``code`` goes in the row."""

    code = "bad_answer"


@dataclass(frozen=True, slots=True)
class Purpose:
    """What an internal call is for: its endpoint and its usage row's tag."""

    endpoint: Endpoint
    tag: str

    @property
    def tags(self) -> dict[str, object]:
        return {"tollway": self.tag}


class InternalCaller:
    def __init__(self, config: ConfigStore, upstreams: Upstreams, settler: Settler) -> None:
        self.config, self.upstreams, self.settler = config, upstreams, settler

    async def call(
        self,
        purpose: Purpose,
        body: dict[str, Any],
        read: Callable[[Reply], T],
        parent: UsageRecord,
        bill_tenant: bool,
        timeout_s: float,
    ) -> T:
        """``read(reply)`` of one ``purpose`` request for ``body["model"]``
        (a public model), settled as its own row (named after ``parent``'s
        tenant when ``bill_tenant``)."""
        snapshot = self.config.current
        model = str(body["model"])
        record = UsageRecord(parent.request_id, purpose.endpoint, model, config=snapshot.config)
        record.tags = purpose.tags
        if bill_tenant:
            record.tenant, record.tenant_id = parent.tenant, parent.tenant_id
            record.key_id, record.key_prefix = parent.key_id, parent.key_prefix
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                plan = snapshot.router.plan(model, {})
                call = Call(purpose.endpoint, body, model, False, record.request_id)
                done = await forward(self.upstreams, snapshot, plan, call, record)
            record.provider, record.provider_model = done.target.provider.name, done.target.model
            record.served_model, record.attempts = done.target.public, done.attempts
            assert done.reply is not None
            # A moderation answer reports no usage: its input is estimated, as
            # the relay does for a client's request.
            usage = done.reply.usage
            if usage is None:
                usage = await metering.off_loop(
                    metering.estimate, body, purpose.endpoint, done.target.model, ""
                )
            record.usage = usage
            return read(done.reply)
        except GatewayError as exc:
            record.fail(exc)
            raise
        except TimeoutError:
            record.fail(UpstreamTimeout(f"The internal {purpose.endpoint} call timed out."))
            raise
        except BadAnswer as exc:
            record.status, record.error_code = 502, exc.code
            raise
        except asyncio.CancelledError:  # its request ended first (the client left)
            record.status, record.client_disconnected = 499, True
            raise
        finally:
            record.latency_ms = (time.perf_counter() - started) * 1000
            self.settler.settle(record)
