"""Forward while the stages' checks run (``Exchange.checks``), and hold the
answer until they pass.

A check that refuses first cancels the forward (the provider's connection
closes, so it stops work); a forward that answers first waits for every
check before the relay sends a byte, and a refusal then closes the stream
it opened. Without checks this is just ``await forwarding``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from proxy.core.errors import GatewayError
from proxy.stages.base import Exchange
from proxy.stages.forward.attempts import Forwarded


async def held(ex: Exchange, forwarding: Coroutine[Any, Any, Forwarded]) -> Forwarded:
    if not ex.checks:
        return await forwarding
    # The group awaits the forward, cancelled when a check refuses first (or
    # when this request is cancelled: the client left). Nothing is raised
    # inside it: the group would wrap it in an ExceptionGroup.
    refusal: GatewayError | None = None
    async with asyncio.TaskGroup() as group:
        fwd = group.create_task(_outcome(forwarding))
        pending: set[asyncio.Future[Any]] = {fwd, *ex.checks}
        while refusal is None and not fwd.done():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            refusal = next((r for c in done - {fwd} if (r := c.result()) is not None), None)
        if refusal is not None:
            fwd.cancel()
    if refusal is not None:
        raise refusal
    answer = fwd.result()
    if isinstance(answer, Exception):
        raise answer
    try:
        for check in ex.checks:
            await asyncio.wait({check})
            _raise_refusal(check)
    except BaseException:
        _keep_usage(ex, answer)
        if answer.stream is not None:
            await answer.stream.aclose()
        raise
    return answer


async def _outcome(forwarding: Coroutine[Any, Any, Forwarded]) -> Forwarded | Exception:
    """The forward's answer or its error, so the group re-raises that error
    as it is (a failed child would come out wrapped in an ExceptionGroup)."""
    try:
        return await forwarding
    except Exception as exc:  # noqa: BLE001 - handed back and raised by ``held``
        return exc


def _raise_refusal(check: asyncio.Future[GatewayError | None]) -> None:
    refusal = check.result()
    if refusal is not None:
        raise refusal


def _keep_usage(ex: Exchange, answer: Forwarded) -> None:
    """A refused answer that the provider already finished is still billed."""
    record = ex.record
    record.provider, record.provider_model = answer.target.provider.name, answer.target.model
    record.attempts = answer.attempts
    if answer.reply is not None and answer.reply.usage is not None:
        record.usage = answer.reply.usage
