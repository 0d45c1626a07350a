"""Incremental checks on one answer's text as it streams, with a bounded hold-back.

Text is released only once no match can still reach into it: the last
``hold_back`` characters stay back, the cut never splits a run of
non-space characters (a key, a JWT, an e-mail address, a placeholder), and
a match touching the held part stays back whole while it may still grow.
So a secret split across any chunk boundaries is whole when it is checked,
and no byte of it was sent before. What stays back is bounded: a run
longer than ``MAX_RUN`` characters, or a growing match longer than
``MAX_MATCH``, is decided as it stands.
"""

from __future__ import annotations

from proxy.stages.guardrails.config import Rule
from proxy.stages.guardrails.scan import Hit, Scan, hits, refusal

MAX_RUN = 4096
MAX_MATCH = 32768
# Text is released in steps of at least this many characters beyond the
# hold-back: each release scans the whole held text, so releasing every
# few-character token would scan each character ~hold_back/token times.
STEP = 32


class Blocked(Exception):
    """A block matched: ``released`` is the safe text before it."""

    def __init__(self, rule: Rule, released: str) -> None:
        super().__init__(rule.guardrail)
        self.rule = rule
        self.released = released
        self.index = 0  # the choice it happened in
        self.tool: int | None = None  # the tool call whose arguments it was in, if one


class HeldText:
    __slots__ = ("_pending", "hold_back", "restore", "rules", "scan")

    def __init__(self, scan: Scan, rules: tuple[Rule, ...], hold_back: int, restore: bool) -> None:
        self.scan = scan
        self.rules = rules
        self.hold_back = hold_back
        self.restore = restore
        self._pending = ""

    def push(self, text: str) -> str:
        """Take the next piece; return what may go to the client now."""
        self._pending += text
        return self._release(final=False)

    def whole(self, text: str) -> str:
        """A text that is complete already (a non-stream answer): checked at once."""
        self._pending += text
        return self._release(final=True)

    def finish(self) -> str:
        """The answer ended: everything still held, checked."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        p = self._pending
        if not final and len(p) - self.hold_back < STEP:
            return ""  # too little to release yet: no scan (see ``STEP``)
        found = hits(p, self.rules) if self.rules else []
        for start, _, rule in found:
            if rule.action == "block":
                self._pending = ""
                self.scan.count(rule, "output")
                raise Blocked(rule, self._out(p[:start], [h for h in found if h[1] <= start]))
        cut = len(p) if final else self._cut(p, found)
        if cut <= 0:
            return ""
        self._pending = p[cut:]
        done = [h for h in found if h[1] <= cut]
        for _, _, rule in done:
            self.scan.count(rule, "output")
        return self._out(p[:cut], done)

    def _cut(self, p: str, found: list[Hit]) -> int:
        cut = len(p) - self.hold_back
        if cut <= 0:
            return 0
        run = cut
        while run > 0 and not p[run - 1].isspace() and cut - run <= MAX_RUN:
            run -= 1
        if cut - run <= MAX_RUN:
            cut = run
        for start, end, _ in found:
            if start < cut < end:
                cut = start
            if start >= cut:
                break
        if cut == 0 and found and len(p) > MAX_MATCH:
            cut = found[0][1]  # one match grew past the bound: decide it as it stands
        return cut

    def _out(self, text: str, done: list[Hit]) -> str:
        """``text`` with its redactions made and, between them, the caller's
        own values restored (never the values this answer's redactions hid)."""
        keep = self.scan.restore if self.restore else _same
        pos, out = 0, []
        for start, end, rule in done:
            if rule.action != "redact":
                continue
            out.append(keep(text[pos:start]))
            out.append(self.scan.placeholder(rule.finder.label, text[start:end], restorable=False))
            pos = end
        out.append(keep(text[pos:]))
        return "".join(out)


def _same(text: str) -> str:
    return text


__all__ = ["Blocked", "HeldText", "refusal"]
