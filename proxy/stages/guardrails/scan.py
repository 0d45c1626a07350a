"""One policy's actions applied to one text, in one direction.

``Scan`` lives for one request: it numbers the placeholders (the same value
gets the same placeholder everywhere in the request, so the model can refer
to it), remembers what each stands for (``restore``), and counts verdicts
(guardrail, detector, category, action, direction), never the matched text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from proxy.core.errors import ContentFiltered
from proxy.stages.guardrails.config import Rule, Rules, gate_groups
from proxy.stages.guardrails.view import DIGIT, RUNS, View

PLACEHOLDER = re.compile(r"\[[A-Z][A-Z_]*_\d+\]")
Hit = tuple[int, int, Rule]
VerdictKey = tuple[str, str, str, str, str]  # guardrail, detector, category, action, direction


def hits(text: str, rules: tuple[Rule, ...]) -> list[Hit]:
    """Every rule's matches, overlaps resolved: the earliest, then the longest wins."""
    # Called for every text of every request: plain loops, no generator or
    # list per rule until one finds something (most texts hold nothing).
    view = View(text)  # what several detectors look at, computed once
    groups = rules.groups if isinstance(rules, Rules) else gate_groups(rules)
    found: list[tuple[int, int, int, Rule]] | None = None
    for (gate, needles), members in groups:
        if gate:
            if gate == RUNS:
                if not view.runs():
                    continue
            elif gate == DIGIT:
                if not view.has_digit():
                    continue
            elif gate not in text:
                continue
            elif needles:
                for needle in needles:
                    if needle in text:
                        break
                else:
                    continue
        for i, rule in members:
            spans = rule.finder.find(text, view)
            if spans:
                if found is None:
                    found = []
                for a, b in spans:
                    found.append((a, b, i, rule))
    if found is None:
        return _NONE
    if len(found) < 2:
        return [(a, b, rule) for a, b, _, rule in found]
    found.sort(key=lambda h: (h[0], -h[1], h[2]))  # a tie goes to the rule listed first
    kept: list[Hit] = []
    for a, b, _, rule in found:
        if not kept or a >= kept[-1][1]:
            kept.append((a, b, rule))
    return kept


_NONE: list[Hit] = []  # never appended to: callers only read a text's hits


@dataclass(slots=True)
class Scan:
    verdicts: dict[VerdictKey, int] = field(default_factory=dict)
    originals: dict[str, str] = field(default_factory=dict)  # placeholder -> value
    _by_value: dict[str, str] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)

    def count(self, rule: Rule, direction: str, n: int = 1) -> None:
        f = rule.finder
        self.tally((rule.guardrail, f.name, f.category, rule.action, direction), n)

    def tally(self, key: VerdictKey, n: int = 1) -> None:
        self.verdicts[key] = self.verdicts.get(key, 0) + n

    def placeholder(self, label: str, value: str, *, restorable: bool = True) -> str:
        """``restorable``: a prompt's value, which ``restore`` may give back to
        its caller; never one an answer's redaction hid."""
        known = self._by_value.get(value)
        if known is not None:
            return known
        n = self._counts[label] = self._counts.get(label, 0) + 1
        tag = self._by_value[value] = f"[{label}_{n}]"
        if restorable:
            self.originals[tag] = value
        return tag

    def apply(self, text: str, rules: tuple[Rule, ...], direction: str) -> str:
        """``text`` with its redactions made; raises ``ContentFiltered`` on a block."""
        found = hits(text, rules)
        if not found:
            return text
        for _, _, rule in found:
            self.count(rule, direction)
        blocked = next((rule for _, _, rule in found if rule.action == "block"), None)
        if blocked is not None:
            raise refusal(blocked, direction)
        out: list[str] = []
        pos = 0
        for start, end, rule in found:
            if rule.action != "redact":
                continue
            out.append(text[pos:start])
            out.append(self.placeholder(rule.finder.label, text[start:end]))
            pos = end
        if pos == 0:
            return text
        out.append(text[pos:])
        return "".join(out)

    def restore(self, text: str) -> str:
        """The caller's own values back in place of this request's placeholders."""
        if not self.originals or "[" not in text:
            return text
        return PLACEHOLDER.sub(lambda m: self.originals.get(m.group(), m.group()), text)

    def records(self) -> list[dict[str, object]]:
        return [
            {
                "guardrail": g,
                "detector": d,
                "category": c,
                "action": a,
                "direction": direction,
                "count": n,
            }
            for (g, d, c, a, direction), n in self.verdicts.items()
        ]


def refusal(rule: Rule, direction: str) -> ContentFiltered:
    what = "request" if direction == "input" else "model's answer"
    f = rule.finder
    return ContentFiltered(
        f"The {what} was blocked by guardrail '{rule.guardrail}' "
        f"(category: {f.category}, detector: {f.name}).",
        guardrail=rule.guardrail,
        category=f.category,
    )
