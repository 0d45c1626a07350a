"""A moderation check's verdict on a prompt or an answer: one internal moderation call
(``Moderator``), its results weighed against the check's thresholds, and
the policy's fail mode when no verdict comes."""

from __future__ import annotations

import logging

from proxy.core.errors import GatewayError
from proxy.core.record import UsageRecord
from proxy.stages.base import Moderator
from proxy.stages.guardrails.moderation import DETECTOR, ModerationCheck
from proxy.stages.guardrails.scan import Scan

log = logging.getLogger("tollway.guardrails")


async def verdict(
    check: ModerationCheck,
    moderator: Moderator | None,
    texts: list[str],
    parent: UsageRecord,
    scan: Scan,
    direction: str = "input",
) -> GatewayError | None:
    """The verdict on ``texts``: None (pass, or a ``log`` action), else the
    error refusing the request: ``ContentFiltered`` (a block) or
    ``GuardrailUnavailable`` (no verdict, fail-closed). Returned, not
    raised, so a ``parallel`` check is a task that never fails. Each flagged
    category and each failure is counted in ``scan`` under the guardrail's
    name."""
    if not texts:
        return None
    try:
        if moderator is None:
            raise RuntimeError("no moderator")  # a stage used without the app's services
        results = await moderator.moderate(
            check.model, texts, parent, check.bill_tenant, check.timeout_s
        )
    except Exception as exc:  # noqa: BLE001 - any failure: the policy's fail mode decides
        return _failed(check, scan, exc, direction)
    flagged = sorted({c for r in results for c in check.flagged(r)})
    action = check.action_on(direction)
    for category in flagged:
        scan.tally((check.guardrail, DETECTOR, category, action, direction))
    if flagged and action == "block":
        return check.refusal(flagged[0], direction)
    return None


def _failed(
    check: ModerationCheck, scan: Scan, exc: Exception, direction: str
) -> GatewayError | None:
    why = "timed out" if isinstance(exc, TimeoutError) else "failed"
    if isinstance(exc, GatewayError):
        why = f"failed ({exc.code})"
    action = "fail_closed" if check.fail_closed else "fail_open"
    scan.tally((check.guardrail, DETECTOR, "unavailable", action, direction))
    log.warning("guardrail %s: %s moderation %s (%s)", check.guardrail, direction, why, action)
    return check.unavailable(why, direction) if check.fail_closed else None
