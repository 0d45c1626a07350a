"""Tenant job events: the seam between what emits them (the batch workers)
and what delivers them (the durable event log, its webhooks and the
``GET /v1/events`` WebSocket). Emitters depend only on this module, so a
gateway without delivery configured still runs its jobs."""

from __future__ import annotations

from typing import Any, Protocol


class EventSink(Protocol):
    async def publish(self, tenant_id: int, type: str, data: dict[str, Any]) -> None:
        """Record one event of ``tenant_id`` durably; returns once stored.

        ``type`` is OpenAI's event name (``batch.completed``, ``batch.failed``,
        ``batch.expired``, ``batch.cancelled``) or a Tollway progress event
        (``batch.in_progress``, ``batch.progress``); ``data`` is the object it
        is about (for batches: the whole OpenAI ``Batch`` object)."""
        ...


class NoEvents:
    """Delivery off: events are dropped, jobs still run."""

    async def publish(self, tenant_id: int, type: str, data: dict[str, Any]) -> None:
        return None
