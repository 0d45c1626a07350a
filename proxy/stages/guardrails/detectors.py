"""The built-in detectors: a compiled pattern, a validator, a cheap pre-check.

Each detector has a ``name`` (``email``), a ``category`` (``pii``,
``secret`` or ``blocklist``) and the ``label`` its redaction placeholders
carry (``[EMAIL_1]``). ``hint`` is a substring every match contains: a text
without it is skipped without running the pattern, which is what keeps a
prompt's scan in the tens of microseconds per KB.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from proxy.stages.guardrails import validators

Span = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Detector:
    name: str
    category: str
    label: str
    pattern: re.Pattern[str]
    validator: Callable[[str], bool] | None = None
    hints: tuple[str, ...] = ()  # a match contains one of these (empty: always run)

    def find(self, text: str) -> Iterator[Span]:
        if self.hints and not any(h in text for h in self.hints):
            return
        for m in self.pattern.finditer(text):
            if self.validator is None or self.validator(m.group()):
                yield m.span()


_DIGITS = tuple("0123456789")


def _d(
    name: str,
    category: str,
    label: str,
    pattern: str,
    validator: Callable[[str], bool] | None = None,
    hints: tuple[str, ...] = (),
    flags: int = 0,
) -> Detector:
    return Detector(name, category, label, re.compile(pattern, flags), validator, hints)


PII = (
    _d(
        "email",
        "pii",
        "EMAIL",
        r"(?<![\w.+-])[A-Za-z0-9][\w.+-]{0,63}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}\b",
        hints=("@",),
    ),
    _d(  # cards before phones: a card's digit groups also look like a phone number
        "card",
        "pii",
        "CARD",
        r"(?<![\w-])\d{4}(?:[ -]?\d{4}){2}[ -]?\d{1,7}(?![\w-])",
        validators.luhn,
        _DIGITS,
    ),
    _d(
        "iban",
        "pii",
        "IBAN",
        r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b",
        validators.iban,
        _DIGITS,
    ),
    _d("ssn", "pii", "SSN", r"(?<![\w-])\d{3}-\d{2}-\d{4}(?![\w-])", validators.ssn, ("-",)),
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
        _DIGITS,
    ),
    _d(
        "ipv4",
        "pii",
        "IP",
        r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)",
        validators.ipv4,
        (".",),
    ),
    _d(
        "ipv6",
        "pii",
        "IP",
        r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])",
        validators.ipv6,
        ("::", ":"),
    ),
)

SECRETS = (
    _d(
        "anthropic_key",
        "secret",
        "API_KEY",
        r"\bsk-ant-[A-Za-z0-9_-]{20,}",
        hints=("sk-ant-",),
    ),
    _d(
        "openai_key",
        "secret",
        "API_KEY",
        r"\bsk-(?!ant-)(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}",
        hints=("sk-",),
    ),
    _d(
        "aws_access_key",
        "secret",
        "API_KEY",
        r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
        hints=("AKIA", "ASIA"),
    ),
    _d("google_api_key", "secret", "API_KEY", r"\bAIza[0-9A-Za-z_-]{35}(?![\w-])", hints=("AIza",)),
    _d(
        "github_token",
        "secret",
        "API_KEY",
        r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b",
        hints=("ghp_", "gho_", "ghu_", "ghs_", "ghr_"),
    ),
    _d("slack_token", "secret", "API_KEY", r"\bxox[bpars]-[A-Za-z0-9-]{10,}", hints=("xox",)),
    _d(
        "private_key",
        "secret",
        "PRIVATE_KEY",
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"
        r"(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|[A-Za-z0-9+/=\s:,-]*)",
        hints=("PRIVATE KEY-----",),
    ),
    _d(
        "jwt",
        "secret",
        "JWT",
        r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
        hints=("eyJ",),
    ),
    _d("tollway_key", "secret", "API_KEY", r"\btw-[A-Za-z0-9_-]{20,}", hints=("tw-",)),
)

BUILTIN: dict[str, Detector] = {d.name: d for d in (*PII, *SECRETS)}
GROUPS: dict[str, tuple[str, ...]] = {
    "pii": tuple(d.name for d in PII),
    "secrets": tuple(d.name for d in SECRETS),
}
