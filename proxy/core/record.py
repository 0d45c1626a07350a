"""The settle stage: every request ends here exactly once, whatever happened.

``UsageRecord`` is what billing, metrics and the access log consume. The
``Settler`` interface is deliberately synchronous: settling must never make
the client wait, so implementations enqueue and write in batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from proxy.core.usage import NO_USAGE, Usage

if TYPE_CHECKING:
    from proxy.config.model import Config
    from proxy.core.errors import GatewayError
    from proxy.core.metering import StreamMeter

log = logging.getLogger("tollway.settle")


@dataclass(slots=True)
class AttemptRecord:
    """One request the forward stage sent to a provider (or tried to)."""

    provider: str
    model: str
    status: int = 0  # the provider's HTTP status; 502/504 when it sent none; 499 abandoned
    error_code: str | None = None
    reached: bool = True  # False only when no connection was made: nothing to bill
    latency_ms: float = 0.0


@dataclass(slots=True)
class UsageRecord:
    request_id: str
    endpoint: str  # the pipeline's endpoint ("chat" for every front door's request)
    public_model: str | None = None
    provider: str | None = None
    provider_model: str | None = None
    # The public model whose target served: the requested one, or the
    # fallback that answered (prices and the cost metric follow it).
    served_model: str | None = None
    stream: bool = False
    status: int = 200
    error_code: str | None = None
    usage: Usage = NO_USAGE
    cached: bool = False
    client_disconnected: bool = False
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    attempts: int = 0
    tenant: str | None = None
    tenant_id: int | None = None
    key_id: str | None = None
    key_prefix: str | None = None  # the key's display prefix, for the access log
    end_user: str | None = None  # OpenAI's ``user`` field (proxy.core.attribution)
    tags: dict[str, object] | None = None  # ``metadata`` and ``x-tollway-tags``
    client_ip: str | None = None  # the peer, or X-Forwarded-For from a trusted proxy
    config: Config | None = None  # the snapshot the request ran on (prices, log policy)
    cache: str = ""  # the response cache's verdict: "hit" | "miss" | "bypass" | "" (off)
    reason: str | None = None  # why a 429 refused it (rate-limit or quota window)
    trace_id: str | None = None  # its trace's, when traced (the access log line names it)
    transcript: dict[str, object] | None = None  # prompt/completion, when logging allows
    admission: object | None = None  # the billing stage's reservation, refunded at settle
    progress: StreamMeter | None = None  # a running stream's meter (journal checkpoints)
    # The request as admitted, while it runs: the crash journal counts its
    # prompt at a checkpoint. Billing's settle drops it and ``progress``: the
    # journal keeps the record until its row lands (the ledger's next batch).
    # Unset until the journal sets it (read with ``getattr``): a field of
    # ``__init__`` cost every record ~250 instructions (``settle_side.py``).
    body: dict[str, Any] | None = field(init=False, repr=False, compare=False)
    # Every provider attempt, in order; the last one served the answer when status < 400.
    attempt_log: list[AttemptRecord] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)
    # Set once by ``proxy.core.pricing.cost_of`` (every settler reads it).
    cost_usd: Decimal | None = None
    costed: bool = False
    # The front door the client came through when it is not the endpoint's
    # own API ("responses", "messages"; ``proxy.doors``); None: it is.
    door: str | None = None

    @property
    def api(self) -> str:
        """The API the client called, as rows, metrics and the access log name it."""
        return self.door or self.endpoint

    def fail(self, exc: GatewayError) -> None:
        self.status, self.error_code = exc.http_status, exc.error_code
        self.reason = getattr(exc, "reason", None)


class Settler(Protocol):
    def settle(self, record: UsageRecord) -> None: ...


class LogSettler:
    """The pass-through default until billing is configured: debug log only."""

    def settle(self, record: UsageRecord) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("settled %s %s %s", record.request_id, record.status, record.usage)
