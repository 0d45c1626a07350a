"""The retry policy: its own module because three sections read it (the
top-level ``retry:``, a model's, a route rule's), each over the one below."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from proxy.config.reader import Node


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How the forward stage retries one request (``retry:`` at top level, per
    model, per route rule; each level overrides the keys it names)."""

    max_attempts: int = 3  # provider requests in all, fallbacks included
    backoff_base_ms: float = 250.0  # a retry of a target waits U(0, min(max, base * 2^n))
    backoff_max_ms: float = 8000.0
    deadline_s: float = 600.0  # bounds all attempts and waits, up to the first byte
    retry_on_429: bool = True


def parse_retry(node: Node, base: RetryPolicy) -> RetryPolicy:
    kw: dict[str, Any] = {}
    for key, val in node.mapping(tuple(RetryPolicy.__dataclass_fields__)).items():
        if key == "max_attempts":
            kw[key] = val.integer(positive=True)
        elif key == "retry_on_429":
            kw[key] = val.boolean()
        elif key == "deadline_s":
            kw[key] = val.number(positive=True)
        elif val.number() < 0:
            raise val.fail("must be >= 0")
        else:
            kw[key] = val.number()
    policy = replace(base, **kw)
    if policy.backoff_max_ms < policy.backoff_base_ms:
        raise node.fail("backoff_max_ms must be >= backoff_base_ms")
    return policy
