"""The ``batches:`` section: where batch lines run and how many at once.

Under the supervisor (``tollway serve --workers N``) lines run in
``workers`` batch processes of their own, at OS priority ``nice``, so the
kernel gives the HTTP workers the CPU first; a single ``tollway serve``
runs them on its own event loop, yielding to interactive requests
(``busy_concurrency``). Each limit bounds how much of them one batch, one
tenant or one process may hold at once; the rest wait in the Postgres queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.config.reader import Node

KEYS = (
    "enabled",
    "workers",
    "nice",
    "idle_priority",
    "worker_concurrency",
    "busy_concurrency",
    "busy_lines_per_s",
    "tenant_concurrency",
    "batch_concurrency",
    "lease_s",
    "poll_interval_s",
    "quota_retry_s",
    "max_file_bytes",
    "max_lines",
    "file_retention_days",
)


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    enabled: bool = True  # False: this instance runs no batch lines (the API still answers)
    # Batch processes the supervisor starts beside the HTTP workers (0: the
    # HTTP workers run the lines themselves); read when the instance starts.
    workers: int = 1
    nice: int = 10  # the batch processes' niceness (0-19): the CPU goes to HTTP first
    # Linux's SCHED_IDLE for the batch processes: they run only on CPU nothing
    # else wants, and a waking HTTP worker takes it from them at once (niceness
    # alone still leaves them a share and a wake-up delay). Off by default: on
    # a machine that is never idle they can starve for seconds, holding a
    # Postgres row lock the HTTP workers' ledger flush then waits for. Read at start.
    idle_priority: bool = False
    worker_concurrency: int = 8  # lines in flight per worker process
    # ... while the process is serving interactive requests: batch lines yield to them
    busy_concurrency: int = 2
    # ... and at most this many lines started a second per process while it
    # is: the lines' own provider calls and Postgres writes land beside the
    # interactive requests' (a fast provider otherwise lets 2 lines run
    # hundreds a second).
    busy_lines_per_s: float = 10.0
    tenant_concurrency: int = 16  # lines in flight per tenant, across the fleet
    batch_concurrency: int = 8  # lines in flight per batch, across the fleet
    lease_s: float = 120.0  # a line's lease: a killed worker's lines run again after it
    poll_interval_s: float = 0.5  # how often an idle worker looks for lines
    quota_retry_s: float = 30.0  # a line refused for quota waits this long, then retries
    max_file_bytes: int = 100 * 1024 * 1024  # the upload cap
    max_lines: int = 50_000  # lines per batch input file (OpenAI's cap)
    file_retention_days: float = 30.0  # uploads and outputs are deleted after this


def parse_batches(raw: Any) -> BatchPolicy:
    if raw is None:
        return BatchPolicy()
    m = Node(raw, "batches").mapping(KEYS)
    d = BatchPolicy()

    def integer(key: str, default: int) -> int:
        return m[key].integer(positive=True) if key in m else default

    def number(key: str, default: float) -> float:
        return m[key].number(positive=True) if key in m else default

    return BatchPolicy(
        enabled=m["enabled"].boolean() if "enabled" in m else d.enabled,
        workers=_at_least(m, "workers", 0, 64, d.workers),
        nice=_at_least(m, "nice", 0, 19, d.nice),
        idle_priority=m["idle_priority"].boolean() if "idle_priority" in m else d.idle_priority,
        worker_concurrency=integer("worker_concurrency", d.worker_concurrency),
        busy_concurrency=integer("busy_concurrency", d.busy_concurrency),
        busy_lines_per_s=number("busy_lines_per_s", d.busy_lines_per_s),
        tenant_concurrency=integer("tenant_concurrency", d.tenant_concurrency),
        batch_concurrency=integer("batch_concurrency", d.batch_concurrency),
        lease_s=number("lease_s", d.lease_s),
        poll_interval_s=number("poll_interval_s", d.poll_interval_s),
        quota_retry_s=number("quota_retry_s", d.quota_retry_s),
        max_file_bytes=integer("max_file_bytes", d.max_file_bytes),
        max_lines=integer("max_lines", d.max_lines),
        file_retention_days=number("file_retention_days", d.file_retention_days),
    )


def _at_least(m: dict[str, Node], key: str, low: int, high: int, default: int) -> int:
    if key not in m:
        return default
    value = m[key].integer()
    if not low <= value <= high:
        raise m[key].fail(f"must be between {low} and {high}")
    return value
