"""Moderation for the gateway's own use (the guardrails): an internal call
(``proxy.pipeline.internal``) to ``/v1/moderations``, settled as its own
usage row tagged ``tollway: guardrails``.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.core.record import UsageRecord
from proxy.pipeline.internal import BadAnswer, InternalCaller, Purpose
from proxy.providers.base import Reply

PURPOSE = Purpose("moderations", "guardrails")


class ModerationFailed(BadAnswer):
    """The provider's answer held no usable result per input."""

    code = "bad_moderation"


def results_of(body: bytes, expected: int) -> list[dict[str, Any]]:
    """The ``results`` of an OpenAI-shaped moderation answer, one per input,
    each with a ``category_scores`` object."""
    try:
        results = orjson.loads(body)["results"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModerationFailed("no results in the provider's answer") from exc
    if (
        not isinstance(results, list)
        or len(results) != expected
        or not all(
            isinstance(r, dict) and isinstance(r.get("category_scores"), dict) for r in results
        )
    ):
        raise ModerationFailed("the provider's results do not match the inputs")
    return results


class InternalModerator(InternalCaller):
    async def moderate(
        self,
        model: str,
        texts: list[str],
        parent: UsageRecord,
        bill_tenant: bool,
        timeout_s: float,
    ) -> list[dict[str, Any]]:
        body = {"model": model, "input": texts}

        def read(reply: Reply) -> list[dict[str, Any]]:
            return results_of(reply.body, len(texts))

        return await self.call(PURPOSE, body, read, parent, bill_tenant, timeout_s)
