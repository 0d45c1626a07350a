"""Guardrails as a stage: check the prompt before the cache, the answer after.

``on_request`` picks the first policy matching the caller (tier, tenant)
and the public model, blocks or redacts the prompt in ``ex.body`` (so the
cache key, the provider and the access log only ever see the redacted
text); ``on_reply`` and ``on_stream`` check the answer and, with
``restore``, put the caller's own values back in place of the placeholders;
``on_answer`` and the stream's ``ModeratedStream`` moderate the answer when
the policy's moderation check has an ``output`` action (the model's own
text, before the local checks and ``restore``); ``on_settle`` records the
verdicts in ``record.extra["guardrails"]``, which the usage row, the
metrics and the access log read.

A policy's moderation check (``moderation``) reads the prompt after its
redactions: ``before`` awaits the verdict in ``on_request``; ``parallel``
starts it there as one of ``ex.checks``, which the pipeline awaits beside
forward (``proxy.pipeline.hold``). A parallel request skips the caches: a
cached answer would be sent before its verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.config.model import Config
from proxy.core.errors import ContentFiltered
from proxy.core.tasks import TaskGroup
from proxy.providers.base import Reply
from proxy.stages.base import ChunkFilter, Exchange, Moderator, Services, Stage
from proxy.stages.guardrails import moderation, verdict
from proxy.stages.guardrails.body import rewrite_reply, rewrite_request
from proxy.stages.guardrails.config import GuardrailSettings, Policy, parse_guardrails
from proxy.stages.guardrails.held import Blocked, HeldText
from proxy.stages.guardrails.moderated import ModeratedStream
from proxy.stages.guardrails.scan import Scan, refusal
from proxy.stages.guardrails.stream import GuardStream

EXTRA_KEY = "guardrails"


@dataclass(slots=True)
class Guarded:
    """One request's policy and its scan (placeholders, verdicts)."""

    policy: Policy
    scan: Scan


class GuardrailsStage(Stage):
    name = "guardrails"
    section = "guardrails"

    def __init__(self) -> None:
        self.moderator: Moderator | None = None
        self.tasks: TaskGroup | None = None

    @classmethod
    def configure(cls, raw: Any, config: Config) -> GuardrailSettings | None:
        return parse_guardrails(raw)

    async def open(self, services: Services) -> None:
        self.moderator, self.tasks = services.moderator, services.tasks

    async def on_request(
        self, ex: Exchange, settings: GuardrailSettings
    ) -> web.StreamResponse | None:
        policy = settings.select(ex.who, ex.model)
        if policy is None:
            return None
        guarded = ex.notes[self.name] = Guarded(policy, Scan())
        if policy.input or policy.output:
            ex.passthrough = False  # the request as checked, the answer checked: in chat
        if policy.input:
            rewrite_request(ex.body, lambda text: guarded.scan.apply(text, policy.input, "input"))
        check = policy.moderation
        if (
            policy.output
            or (policy.restore and guarded.scan.originals)
            or (check is not None and check.output != "off")
        ):
            # A cached answer would skip the output checks, and one kept with
            # restored values would hand them to the next caller whose prompt
            # redacts to the same text.
            ex.cacheable = False
        # A /v1/moderations request asks that very question: not asked twice.
        if check is not None and check.action != "off" and ex.endpoint != "moderations":
            await self._moderate(ex, check, guarded.scan)
        return None

    async def _moderate(self, ex: Exchange, check: moderation.ModerationCheck, scan: Scan) -> None:
        texts: list[str] = []

        def keep(text: str) -> str:
            texts.append(text)
            return text

        rewrite_request(ex.body, keep)
        pending = verdict.verdict(check, self.moderator, texts, ex.record, scan)
        if check.mode == "before" or self.tasks is None:
            refusal = await pending
            if refusal is not None:
                raise refusal
            return
        ex.cacheable = False
        ex.checks.append(self.tasks.spawn(pending, name=f"moderation {ex.record.request_id}"))

    async def on_answer(self, ex: Exchange, settings: GuardrailSettings, reply: Reply) -> Reply:
        """The whole answer moderated before its first byte (either mode)."""
        guarded = ex.notes.get(self.name)
        check = _output_check(guarded, ex)
        if check is None or not isinstance(guarded, Guarded) or reply.status != 200:
            return reply
        texts: list[str] = []

        def keep(text: str) -> str:
            if text:
                texts.append(text)
            return text

        rewrite_reply(reply.body, keep)
        joined = ["\n".join(texts)] if texts else []
        refused = await verdict.verdict(
            check, self.moderator, joined, ex.record, guarded.scan, "output"
        )
        if refused is not None:
            _bill_refused(ex, reply)
            raise refused
        return reply

    def on_reply(self, ex: Exchange, settings: GuardrailSettings, reply: Reply) -> Reply:
        guarded = ex.notes.get(self.name)
        if not isinstance(guarded, Guarded) or reply.status != 200:
            return reply
        policy, scan = guarded.policy, guarded.scan
        if not policy.output and not (policy.restore and scan.originals):
            return reply
        try:
            body = rewrite_reply(reply.body, lambda text: _answer(scan, policy, text))
        except ContentFiltered:
            _bill_refused(ex, reply)
            raise
        return reply if body is None else Reply(body, reply.usage, reply.status, reply.headers)

    def on_stream(self, ex: Exchange, settings: GuardrailSettings) -> ChunkFilter | None:
        guarded = ex.notes.get(self.name)
        if not isinstance(guarded, Guarded):
            return None
        policy, scan = guarded.policy, guarded.scan
        local = None
        if policy.output or (policy.restore and scan.originals):
            local = GuardStream(policy, scan)
        check = _output_check(guarded, ex)
        if check is None:
            return local
        return ModeratedStream(check, self.moderator, self.tasks, ex, scan, local)

    def on_settle(self, ex: Exchange, settings: GuardrailSettings) -> None:
        for check in ex.checks:  # the request ended before its verdict (the client left)
            check.cancel()
        guarded = ex.notes.get(self.name)
        if isinstance(guarded, Guarded) and guarded.scan.verdicts:
            ex.record.extra[EXTRA_KEY] = guarded.scan.records()


def _output_check(guarded: object, ex: Exchange) -> moderation.ModerationCheck | None:
    """The policy's moderation check, when it moderates answers (not the
    answer of ``/v1/moderations`` itself, nor an embedding's vectors)."""
    if not isinstance(guarded, Guarded) or ex.endpoint in ("moderations", "embeddings"):
        return None
    check = guarded.policy.moderation
    return check if check is not None and check.output != "off" else None


def _bill_refused(ex: Exchange, reply: Reply) -> None:
    """A refused answer was still generated (and billed by the provider): its
    usage stays on the record, as for an answer a parallel check refused."""
    if reply.usage is not None:
        ex.record.usage = reply.usage


def _answer(scan: Scan, policy: Policy, text: str) -> str:
    """A whole answer text: checked, then the caller's values restored."""
    held = HeldText(scan, policy.output, policy.hold_back, policy.restore)
    try:
        return held.whole(text)
    except Blocked as blocked:
        raise refusal(blocked.rule, "output") from None
