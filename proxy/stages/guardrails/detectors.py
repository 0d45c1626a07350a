"""The built-in detectors: a compiled pattern, a validator, a cheap pre-check.

Each detector has a ``name`` (``email``), a ``category`` (``pii``,
``secret`` or ``blocklist``) and the ``label`` its redaction placeholders
carry (``[EMAIL_1]``). ``hints`` are substrings a match contains one of: a
text without any is skipped without running the pattern. ``where`` says
where a match can be, so the pattern runs only there (see ``view``):
anywhere, in a run of digits, at an IBAN's ``AA00`` start, or around an
``@``; the pattern itself is the same either way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from proxy.stages.guardrails import validators
from proxy.stages.guardrails.view import DIGIT, RUNS, Span, View

EMAIL_LOCAL = 64  # characters of an address's local part, at most


@dataclass(frozen=True, slots=True)
class Detector:
    name: str
    category: str
    label: str
    pattern: re.Pattern[str]
    validator: Callable[[str], bool] | None = None
    hints: tuple[str, ...] = ()  # a match contains one of these (empty: always run)
    where: str = "anywhere"  # or "digits", "iban", "at", "hint" (a match starts with one)
    # A substring in every match, checked once per text (view.DIGIT: a digit;
    # view.RUNS: a run of digits).
    gate: str = ""
    min_digits: int = 0  # "digits": the fewest digits a match it accepts holds

    def find(self, text: str, view: View | None = None) -> list[Span]:
        # Called for every text and detector: plain loops, no generators,
        # until a hint says the pattern may match.
        if self.hints:
            for hint in self.hints:
                if hint in text:
                    break
            else:
                return []
        if self.where == "anywhere":
            matches: Iterable[re.Match[str]] = self.pattern.finditer(text)
        elif self.where == "digits":
            view = view or View(text)
            least = self.min_digits
            for run in view.runs():
                if run[2] >= least:
                    break
            else:
                return []  # no run long enough: no generator, no pattern
            matches = self._in_runs(text, view)
        elif self.where == "iban":
            view = view or View(text)
            shape = view.shape()
            if shape is not None and b"AA00" not in shape:
                return []
            matches = self._at_shape(text, view, b"AA00")
        elif self.where == "hint":
            matches = self._at_hints(text)
        else:
            matches = self._around_at(text)
        check = self.validator
        return [m.span() for m in matches if check is None or check(m.group())]

    def _in_runs(self, text: str, view: View) -> Iterator[re.Match[str]]:
        """Matches in each run of digits: one leading ``+`` or ``(`` before
        it, two characters after it for the look-ahead."""
        n = len(text)
        for start, end, digits in view.runs():
            if digits >= self.min_digits:
                yield from self.pattern.finditer(text, max(0, start - 1), min(n, end + 2))

    def _at_shape(self, text: str, view: View, start: bytes) -> Iterator[re.Match[str]]:
        """Matches starting where the text's shape is ``start`` (what
        ``finditer`` would find: leftmost first, none inside another)."""
        shape = view.shape()
        if shape is None:
            yield from self.pattern.finditer(text)
            return
        pos = done = 0
        while (i := shape.find(start, pos)) >= 0:
            pos = i + 1
            if i >= done and (m := self.pattern.match(text, i)) is not None:
                done = m.end()
                yield m

    def _at_hints(self, text: str) -> Iterator[re.Match[str]]:
        """Matches starting at a hint (the pattern starts with one)."""
        starts: list[int] = []
        for hint in self.hints:
            pos = 0
            while (i := text.find(hint, pos)) >= 0:
                starts.append(i)
                pos = i + 1
        done = 0
        for i in sorted(starts):
            if i >= done and (m := self.pattern.match(text, i)) is not None:
                done = m.end()
                yield m

    def _around_at(self, text: str) -> Iterator[re.Match[str]]:
        """Matches holding an ``@``: each holds exactly one, with at most
        ``EMAIL_LOCAL`` characters before it and no ``@`` or space after it."""
        pos = done = 0
        n = len(text)
        while (at := text.find("@", pos)) >= 0:
            pos = at + 1
            if at < done:
                continue
            end = at + 1
            while end < n and (text[end].isalnum() or text[end] in ".-"):
                end += 1
            for m in self.pattern.finditer(text, max(done, at - EMAIL_LOCAL - 1), min(n, end + 1)):
                done = m.end()
                yield m


def _d(
    name: str,
    category: str,
    label: str,
    pattern: str,
    validator: Callable[[str], bool] | None = None,
    hints: tuple[str, ...] = (),
    where: str = "anywhere",
    gate: str = "",
    min_digits: int = 0,
) -> Detector:
    if not gate:
        gate = RUNS if where == "digits" else DIGIT if where == "iban" else ""
        gate = gate or (hints[0] if len(hints) == 1 else "")
    return Detector(
        name, category, label, re.compile(pattern), validator, hints, where, gate, min_digits
    )


PII = (
    _d(
        "email",
        "pii",
        "EMAIL",
        r"(?<![\w.+-])[A-Za-z0-9][\w.+-]{0,63}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}\b",
        hints=("@",),
        where="at",
    ),
    _d(  # cards before phones: a card's digit groups also look like a phone number
        "card",
        "pii",
        "CARD",
        r"(?<![\w-])\d{4}(?:[ -]?\d{4}){2}[ -]?\d{1,7}(?![\w-])",
        validators.luhn,
        where="digits",
        min_digits=13,  # luhn: 13-19 digits
    ),
    _d(
        "iban",
        "pii",
        "IBAN",
        r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b",
        validators.iban,
        where="iban",
    ),
    _d(
        "ssn",
        "pii",
        "SSN",
        r"(?<![\w-])\d{3}-\d{2}-\d{4}(?![\w-])",
        validators.ssn,
        ("-",),
        "digits",
        min_digits=9,
    ),
    _d(
        "phone",
        "pii",
        "PHONE",
        # +44 20 7946 0958, +1 (555) 123-4567, (555) 123-4567, 555-123-4567,
        # 555.123.4567, 020 7946 0958, 07700 900123, 030/1234567
        r"(?<![\w+./-])(?:"
        r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
        r"|\(\d{3}\) ?\d{3}[ .-]\d{4}"
        r"|[2-9]\d{2}([.-])\d{3}\1\d{4}"
        r"|0\d{2,4}[ /]\d{3,4}(?: ?\d{3,4})?"
        r")(?![\w./-])",
        validators.phone,
        where="digits",
        min_digits=7,  # validators.phone: 7-15 digits
    ),
    _d(
        "ipv4",
        "pii",
        "IP",
        r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)",
        validators.ipv4,
        (".",),
        "digits",
        min_digits=4,
    ),
    _d(
        "ipv6",
        "pii",
        "IP",
        r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])",
        validators.ipv6,
        (":",),
    ),
)

SECRETS = (
    _d(
        "anthropic_key",
        "secret",
        "API_KEY",
        r"\bsk-ant-[A-Za-z0-9_-]{20,}",
        hints=("sk-ant-",),
        where="hint",
        gate="-",
    ),
    _d(
        "openai_key",
        "secret",
        "API_KEY",
        r"\bsk-(?!ant-)(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}",
        hints=("sk-",),
        where="hint",
        gate="-",
    ),
    _d(
        "aws_access_key",
        "secret",
        "API_KEY",
        r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
        hints=("AKIA", "ASIA"),
        where="hint",
        gate="A",
    ),
    _d(
        "google_api_key",
        "secret",
        "API_KEY",
        r"\bAIza[0-9A-Za-z_-]{35}(?![\w-])",
        hints=("AIza",),
        gate="A",
    ),
    _d(
        "github_token",
        "secret",
        "API_KEY",
        r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b",
        hints=("ghp_", "gho_", "ghu_", "ghs_", "ghr_"),
        where="hint",
        gate="_",
    ),
    _d(
        "slack_token",
        "secret",
        "API_KEY",
        r"\bxox[bpars]-[A-Za-z0-9-]{10,}",
        hints=("xox",),
        gate="-",
    ),
    _d(
        "private_key",
        "secret",
        "PRIVATE_KEY",
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"
        r"(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|[A-Za-z0-9+/=\s:,-]*)",
        hints=("PRIVATE KEY-----",),
        gate="-",
    ),
    _d(
        "jwt",
        "secret",
        "JWT",
        r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
        hints=("eyJ",),
        where="hint",
    ),
    _d(
        "tollway_key",
        "secret",
        "API_KEY",
        r"\btw-[A-Za-z0-9_-]{20,}",
        hints=("tw-",),
        gate="-",
        where="hint",
    ),
)

BUILTIN: dict[str, Detector] = {d.name: d for d in (*PII, *SECRETS)}
GROUPS: dict[str, tuple[str, ...]] = {
    "pii": tuple(d.name for d in PII),
    "secrets": tuple(d.name for d in SECRETS),
}
