"""Sends the tenants' event webhooks: every worker runs one ``Deliverer``.

It claims due deliveries from Postgres (``proxy.stores.webhooks.claim``;
several workers share the queue without sending an attempt twice), POSTs
each one signed the Standard Webhooks way with the endpoint's secret, and
records the attempt. A 2xx is delivered; anything else (another status, a
redirect, a refused or reset connection, the timeout) is retried after
``backoff_s``, doubling, up to ``max_attempts``, then marked failed.

Redirects are never followed: the endpoint's URL is what the operator
approved, and a redirect could carry the signed event somewhere else. The
``webhook-id`` is the event's id, the same on every retry, so a receiver
can drop a repeat. Each attempt is counted by outcome (delivered, retried,
failed) and timed in the metrics, when it is given them. It wakes when an
event is announced (the event log's notifications) and otherwise when the
earliest pending retry is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp
import asyncpg

from proxy.core import webhooks
from proxy.stages.settle.events import WebhookSettings
from proxy.stages.settle.metrics import Metrics
from proxy.stores import webhooks as store
from proxy.stores.pgwait import UNAVAILABLE

log = logging.getLogger("tollway.webhooks")
_BATCH = 16
_IDLE_POLL_S = 30.0  # a pending retry claimed by a worker that died is found by then
_ERROR_MAX = 300


class Deliverer:
    def __init__(
        self,
        pool: asyncpg.Pool,
        http: aiohttp.ClientSession,
        settings: Callable[[], WebhookSettings],
        metrics: Metrics | None = None,
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._http = http
        self._settings = settings
        self._wake = asyncio.Event()
        self.delivered = 0
        self.failed_attempts = 0

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                busy = await self.once()
            except UNAVAILABLE as exc:
                log.warning("webhooks: the delivery queue is unreachable (%s)", exc)
                busy = False
            if busy:
                continue
            try:
                due = await store.next_due_in(self._pool)
            except UNAVAILABLE:
                due = None
            wait = _IDLE_POLL_S if due is None else min(_IDLE_POLL_S, due + 0.01)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            self._wake.clear()

    async def once(self) -> bool:
        """Claim and send one batch; True when there was something to send."""
        s = self._settings()
        claimed = await store.claim(self._pool, _BATCH, s.timeout_s + 5)
        if claimed:
            await asyncio.gather(*(self._attempt(d, s) for d in claimed))
        return bool(claimed)

    async def _attempt(self, d: store.Delivery, s: WebhookSettings) -> None:
        started = time.monotonic()
        status, error = await self._post(d, s)
        retry = None if error is None else s.retry_in(d.attempt)
        if self._metrics is not None:
            outcome = "delivered" if error is None else "failed" if retry is None else "retried"
            self._metrics.webhook_attempt(outcome, time.monotonic() - started)
        if error is None:
            self.delivered += 1
        else:
            self.failed_attempts += 1
            if retry is None:
                log.error(
                    "webhook %s for event %s failed %d times; giving up (last: %s)",
                    d.endpoint_id,
                    d.event_id,
                    d.attempt,
                    error,
                )
        try:
            await store.finish(self._pool, d, status, error, retry)
        except UNAVAILABLE as exc:
            # The claim runs out and the attempt is made again: at least once.
            log.warning("webhooks: could not record an attempt (%s)", exc)

    async def _post(self, d: store.Delivery, s: WebhookSettings) -> tuple[int | None, str | None]:
        body = d.body()
        try:
            key = webhooks.secret_key(store.open_secret(d.secret))
        except ValueError as exc:
            return None, f"bad secret: {exc}"
        try:
            async with self._http.post(
                d.url,
                data=body,
                headers=webhooks.headers(key, body, msg_id=d.event_id),
                timeout=aiohttp.ClientTimeout(total=s.timeout_s),
                allow_redirects=False,
            ) as resp:
                if 200 <= resp.status < 300:
                    return resp.status, None
                if 300 <= resp.status < 400:
                    return resp.status, f"HTTP {resp.status}: redirects are not followed"
                return resp.status, f"HTTP {resp.status}"
        except TimeoutError:
            return None, f"no answer within {s.timeout_s:g}s"
        except aiohttp.ClientError as exc:
            return None, (f"{type(exc).__name__}: {exc}")[:_ERROR_MAX]
