"""Moderation: a model's verdict on the prompt, through the gateway's own
providers (``/v1/moderations``, ``omni-moderation-latest`` categories).

::

    - name: moderation
      moderation:
        model: omni-moderation-latest   # a public model of this gateway
        mode: before                    # before | parallel
        timeout_s: 2
        fail: closed                    # closed: refuse unchecked (503); open: let through
        thresholds: {violence: 0.4, default: 0.8}
        bill: tenant                    # tenant | gateway: whose usage row the call is
      input: block                      # block | log | off: the prompt
      output: block                     # block | log | off: the model's answer

A category is flagged when its score reaches its threshold; a category
without one (and no ``default``) is flagged when the model's own boolean
says so. On the prompt, ``before`` answers first, then forwards;
``parallel`` forwards at once and holds the answer's first byte until the
verdict (a block cancels the upstream).

On the answer (``output``), the model's own text is moderated, before the
policy's redactions and ``restore`` (the moderation provider never sees
the caller's restored values), including tool-call arguments. A whole
(non-stream) answer is moderated before its first byte is sent, in either
mode. A stream is moderated in segments of ``SEGMENT`` characters (and its
rest at the end): ``before`` holds each segment's events until its verdict
(the client gets the text a segment at a time; nothing unmoderated is
sent); ``parallel`` sends the text at once and moderates beside it, holding
only the end of the stream (the finish and ``[DONE]``) until every verdict
is in. A block ends the stream with ``finish_reason: "content_filter"``
and an SSE error event; in ``parallel`` mode the text sent before the
verdict has been seen by the client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.config.reader import Node
from proxy.core.errors import ContentFiltered, GuardrailUnavailable
from proxy.providers.moderation import CATEGORIES, DEFAULT_MODEL

MODES = ("before", "parallel")
SEGMENT = 1000  # characters of a streamed answer moderated per call
_KEYS = ("model", "mode", "timeout_s", "fail", "thresholds", "bill")
DETECTOR = "moderation"


@dataclass(frozen=True, slots=True)
class ModerationCheck:
    guardrail: str
    action: str  # on the prompt: block | log | off
    model: str
    mode: str
    timeout_s: float
    fail_closed: bool
    thresholds: Mapping[str, float]
    default: float | None
    bill_tenant: bool
    output: str = "off"  # on the answer: block | log | off

    def action_on(self, direction: str) -> str:
        return self.action if direction == "input" else self.output

    def flagged(self, result: Mapping[str, Any]) -> list[str]:
        """The categories of one result that reach their thresholds."""
        scores = result.get("category_scores") or {}
        flags = result.get("categories") or {}
        out = []
        for category, score in scores.items():
            limit = self.thresholds.get(category, self.default)
            if limit is None:
                hit = isinstance(flags, dict) and flags.get(category) is True
            else:
                hit = isinstance(score, int | float) and score >= limit
            if hit:
                out.append(str(category))
        return out

    def refusal(self, category: str, direction: str = "input") -> ContentFiltered:
        what = "request" if direction == "input" else "model's answer"
        return ContentFiltered(
            f"The {what} was blocked by guardrail '{self.guardrail}' "
            f"(category: {category}, detector: {DETECTOR}).",
            guardrail=self.guardrail,
            category=category,
        )

    def unavailable(self, why: str, direction: str = "input") -> GuardrailUnavailable:
        what = "request" if direction == "input" else "model's answer"
        return GuardrailUnavailable(
            f"The {what} could not be checked by guardrail '{self.guardrail}': "
            f"its moderation model '{self.model}' {why}, and the policy is fail-closed. "
            "Try again later."
        )


def parse(node: Node, guardrail: str, m: dict[str, Node]) -> ModerationCheck:
    """The ``moderation:`` mapping of a detector entry ``m`` (its actions included)."""
    actions = {}
    for direction in ("input", "output"):
        value = m[direction].value if direction in m else "off"
        if value not in ("block", "log", "off"):
            raise m[direction].fail("moderation's action must be 'block', 'log' or 'off'")
        actions[direction] = str(value)
    if actions["input"] == actions["output"] == "off":
        raise node.fail("input/output: give moderation an action ('block' or 'log')")
    cfg = m["moderation"].mapping(_KEYS)
    mode = cfg["mode"].string() if "mode" in cfg else "before"
    if mode not in MODES:
        raise cfg["mode"].fail(f"must be one of: {', '.join(MODES)}")
    fail = cfg["fail"].string() if "fail" in cfg else "closed"
    if fail not in ("open", "closed"):
        raise cfg["fail"].fail("must be 'open' or 'closed'")
    bill = cfg["bill"].string() if "bill" in cfg else "tenant"
    if bill not in ("tenant", "gateway"):
        raise cfg["bill"].fail("must be 'tenant' or 'gateway'")
    timeout = cfg["timeout_s"].number(positive=True) if "timeout_s" in cfg else 2.0
    thresholds = _thresholds(cfg["thresholds"]) if "thresholds" in cfg else {}
    return ModerationCheck(
        guardrail=guardrail,
        action=actions["input"],
        output=actions["output"],
        model=cfg["model"].string() if "model" in cfg else DEFAULT_MODEL,
        mode=mode,
        timeout_s=timeout,
        fail_closed=fail == "closed",
        thresholds={k: v for k, v in thresholds.items() if k != "default"},
        default=thresholds.get("default"),
        bill_tenant=bill == "tenant",
    )


def _thresholds(node: Node) -> dict[str, float]:
    out = {}
    for key, child in node.mapping(("default", *CATEGORIES)).items():
        value = child.number()
        if not 0 <= value <= 1:
            raise child.fail("must be between 0 and 1")
        out[key] = value
    return out
