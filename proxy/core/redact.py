"""The redaction layer: no secret reaches a log line, an error body or a metric.

Three nets, applied to every string that leaves the process that way:

- **shapes**: Tollway API keys (``tw-`` + 43 characters; the 10-character
  display prefix is kept), ``Bearer <token>``, ``Authorization:``/``api-key:``
  style header values, ``?key=`` URL parameters, URL passwords, and common
  provider key shapes (``sk-...``, ``sk-ant-...``, ``AIza...``); after
  ``Bearer`` or ``api_key:`` only a value is masked, never an ordinary word
  or placeholder, so the gateway's own instructions ("Authorization: Bearer
  YOUR_KEY") and config errors naming a key path stay readable;
- **known values**: every provider ``api_key`` and header value of every
  config snapshot built in this process (``remember_config``), the admin key
  (``remember``), and at install time every environment variable whose name
  says it is a secret (``*_KEY``, ``*SECRET*``, ``*TOKEN*``, ``*PASSWORD*``);
- **all log records**: ``install`` wraps the log record factory, so every
  record of every logger (ours, aiohttp's, asyncpg's) is formatted once and
  scrubbed before any handler or formatter sees it, tracebacks included.

The redactor is process state on purpose (the one exception to STYLE rule
3): logging itself is process-global, and a record from a third-party logger
knows nothing about any app.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.config.model import Config

MASK = "[REDACTED]"
_MIN_SECRET = 8  # shorter "secrets" would redact ordinary words
_SECRET_ENV = re.compile(r"(^|_)(KEY|API_KEY|SECRET|TOKEN|PASSWORD|PASSWD)(_|$)|SECRET|PASSWORD")

# A "value" after ``Bearer`` or ``api_key:`` that is an ordinary word is the
# gateway's own text, not a secret: "Bearer auth", "Bearer YOUR_KEY", "api_key:
# sealed value ...", "api_key: environment variable ... is not set". A word
# is letters in one case (capitalised at most) or an upper-case identifier,
# without digits; random tokens of any real length have digits or both cases.
_WORD = re.compile(r"[A-Za-z][a-z]{0,23}|[A-Z][A-Z_]{0,39}")
_WORD_TAIL = ".:)("


def looks_secret(value: str) -> bool:
    """Whether a token in a secret's place is a value rather than a word or placeholder."""
    if value.startswith(MASK[:-1]):  # already masked (the pattern stops before "]")
        return False
    return not _WORD.fullmatch(value.rstrip(_WORD_TAIL))


def _mask_value(group: int) -> Callable[[re.Match[str]], str]:
    """A replacement that masks group ``group`` (the value) only when it looks secret."""

    def repl(m: re.Match[str]) -> str:
        value = m.group(group)
        if not looks_secret(value):
            return m.group(0)
        return m.group(0)[: m.start(group) - m.start(0)] + MASK

    return repl


# (substring triggers on the lowercased text, pattern, replacement): a pattern
# runs only when one of its triggers is in the text, so a clean line costs a
# dozen substring scans (about 3 µs for an access line), not eight regex passes.
_SHAPES: list[tuple[tuple[str, ...], re.Pattern[str], str | Callable[[re.Match[str]], str]]] = [
    # Tollway keys: keep the display prefix (it is stored and shown anyway).
    (
        ("tw-",),
        re.compile(r"(tw-[A-Za-z0-9_-]{7})[A-Za-z0-9_-]{36}(?![A-Za-z0-9_-])"),
        r"\1" + MASK,
    ),
    (("bearer",), re.compile(r"(?i)\b(bearer)(\s+)([^\s\"',;}\]]+)"), _mask_value(3)),
    (("basic",), re.compile(r"(?i)\b(basic)(\s+)[A-Za-z0-9+/]{8,}={0,2}"), r"\1\2" + MASK),
    (
        ("authorization", "api-key", "api_key", "apikey"),
        re.compile(
            r"(?i)\b((?:proxy-)?authorization|x-api-key|api-key|x-goog-api-key|api_key|apikey)"
            r"(\"?'?\s*[:=]\s*\"?'?)(?!\s*(?:bearer|basic)\b)([^\s\"',;}\]&]+)"
        ),
        _mask_value(3),
    ),
    (
        ("key=", "token="),
        re.compile(r"(?i)([?&](?:key|api_key|apikey|access_token|token)=)[^&\s\"'#]+"),
        r"\1" + MASK,
    ),
    (("://",), re.compile(r"(://[^:/@\s]+:)[^@/\s]+@"), r"\1" + MASK + "@"),
    (("sk-",), re.compile(r"sk-(?:ant-|proj-)?[A-Za-z0-9_-]{16,}"), "sk-" + MASK),
    (("aiza",), re.compile(r"AIza[0-9A-Za-z_-]{30,}"), MASK),
]


_TRIGGERS = tuple(trigger for triggers, _, _ in _SHAPES for trigger in triggers)
# A key's display prefix as ``stores.apikeys.display_prefix`` cuts it: "tw-" + 7.
_DISPLAY_PREFIX = re.compile(r"tw-[A-Za-z0-9_-]{7}")
_PREFIXES_MAX = 4096  # key prefixes whose verdict is kept (one per key in use)
_UNSEEN = "\x00unseen"  # no verdict kept yet (no key prefix holds a NUL)


class Redactor:
    """Scrubs secrets from strings; known values can be added at any time."""

    def __init__(self) -> None:
        self._known: set[str] = set()
        self._longest_first: tuple[str, ...] = ()
        self._lock = threading.Lock()
        # ``untouched``'s verdict on a key prefix: the part of it to search
        # (its tail when it is a display prefix), or None when it holds a
        # remembered value. Dropped whenever a value is remembered.
        self._prefixes: dict[str, str | None] = {}

    def remember(self, *values: str | None) -> None:
        fresh = {v for v in values if v and len(v) >= _MIN_SECRET and v not in self._known}
        if not fresh:
            return
        with self._lock:
            self._known |= fresh
            self._longest_first = tuple(sorted(self._known, key=len, reverse=True))
            self._prefixes = {}

    def remember_env(self, env: dict[str, str] | os._Environ[str]) -> None:
        self.remember(*(v for k, v in env.items() if _SECRET_ENV.search(k.upper())))

    def remember_config(self, config: Config) -> None:
        for provider in config.providers.values():
            self.remember(provider.api_key, *provider.headers.values())

    def scrub(self, text: str) -> str:
        for secret in self._longest_first:
            if secret in text:
                text = text.replace(secret, MASK)
        low = text.lower()
        for triggers, pattern, repl in _SHAPES:
            for trigger in triggers:
                if trigger in low:
                    # ``sub`` sets up its replacement even when nothing
                    # matches (~10x a ``search``): a billed request's access
                    # line holds "tw-" (its key's display prefix) every time.
                    if pattern.search(text):
                        text = pattern.sub(repl, text)
                    break
        return text

    def untouched(self, text: str, key_prefix: str | None = None) -> bool:
        """Whether ``scrub`` would leave ``text`` as it is without looking
        further: no remembered value and no shape's trigger in it (a shape's
        pattern runs only where its trigger is).

        ``key_prefix``: a key's display prefix, a separate field of the same
        line (quoted in JSON). Its "tw-" is the key shape's trigger, but no
        shape can match inside a whole display prefix: the key pattern needs
        36 characters more, the others whitespace, a separator, "[?&]" or 16+
        characters. So it sends no line through the whole scrub: only its
        tail is looked at for triggers, all of it for remembered values."""
        if key_prefix:
            prefixes = self._prefixes
            searched = prefixes.get(key_prefix, _UNSEEN)
            if searched is _UNSEEN:
                searched = self._prefix_part(key_prefix)
                if len(prefixes) >= _PREFIXES_MAX:
                    prefixes.clear()
                prefixes[key_prefix] = searched
            if searched is None:
                return False
            text = f"{text}\x00{searched}"
        for secret in self._longest_first:
            if secret in text:
                return False
        low = text.lower()
        return not any(trigger in low for trigger in _TRIGGERS)

    def _prefix_part(self, key_prefix: str) -> str | None:
        """What of ``key_prefix`` ``untouched`` searches: a display prefix's
        tail (None when it holds a remembered value), any other text whole."""
        if _DISPLAY_PREFIX.fullmatch(key_prefix):
            return None if self.remembers_any(key_prefix) else key_prefix[3:]
        return key_prefix

    def remembers_any(self, text: str) -> bool:
        """Whether ``text`` holds a remembered value (``untouched``'s first half)."""
        return any(secret in text for secret in self._longest_first)

    def scrub_bytes(self, data: bytes) -> bytes:
        text = data.decode("utf-8", "replace")
        clean = self.scrub(text)
        return data if clean == text else clean.encode()

    def secrets(self) -> Iterable[str]:
        return frozenset(self._known)


REDACTOR = Redactor()


def scrub(text: str) -> str:
    return REDACTOR.scrub(text)


def scrub_bytes(data: bytes) -> bytes:
    return REDACTOR.scrub_bytes(data)


def untouched(text: str, key_prefix: str | None = None) -> bool:
    return REDACTOR.untouched(text, key_prefix)


def remember(*values: str | None) -> None:
    REDACTOR.remember(*values)


def remember_config(config: Config) -> None:
    REDACTOR.remember_config(config)


class RedactingFilter(logging.Filter):
    """Scrubs a record in place: message (with its args), traceback, stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        scrub_record(record)
        return True


def scrub_record(record: logging.LogRecord) -> None:
    if getattr(record, "_tollway_scrubbed", False):
        return
    try:
        message = record.getMessage()
    except (TypeError, ValueError):  # a broken format string: keep it, scrubbed
        message = f"{record.msg} {record.args}"
    record.msg, record.args = scrub(message), None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = scrub(record.exc_text)
    if record.stack_info:
        record.stack_info = scrub(record.stack_info)
    record._tollway_scrubbed = True


_installed = False


def install() -> Redactor:
    """Scrub every log record of this process from now on (idempotent)."""
    global _installed
    if not _installed:
        _installed = True
        REDACTOR.remember_env(os.environ)
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            scrub_record(record)
            return record

        logging.setLogRecordFactory(factory)
    return REDACTOR
