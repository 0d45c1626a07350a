"""The canary-secret sweep: no secret the suite uses may reach a log line.

``conftest`` attaches ``LeakWatch`` to the root logger around every test of
the suite (with ``tollway`` loggers at INFO, so access lines are emitted) and
fails the test if any record, as any handler would see it, holds a full
Tollway API key, a canary secret, or a ``Bearer`` token. Tests that use a
secret of another shape add it with ``CANARIES.add``.
"""

from __future__ import annotations

import logging
import re

# Secrets the suite's configs and tests use (provider keys, admin keys).
CANARIES: set[str] = {
    "sk-provider-secret",
    "admin-canary-7d1f",
    "admin-secret-for-tests",
}
_SHAPES = (
    re.compile(r"tw-[A-Za-z0-9_-]{43}"),  # a whole Tollway API key
    re.compile(r"(?i)bearer\s+(?!\[REDACTED\])\S+"),
    re.compile(r"canary-secret-[0-9a-f]+"),
)


def leaks_in(text: str) -> list[str]:
    found = [c for c in CANARIES if c in text]
    found += [m.group(0) for p in _SHAPES for m in p.finditer(text)]
    return found


class LeakWatch(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.leaks: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage() + (record.exc_text or "") + (record.stack_info or "")
        if record.exc_info and not record.exc_text:
            text += logging.Formatter().formatException(record.exc_info)
        for leak in leaks_in(text):
            self.leaks.append((record.name, leak))
