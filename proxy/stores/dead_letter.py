"""Usage rows Postgres refuses for their content, kept aside instead of retried.

A refused row (a NUL in a text column, ``\\u0000`` in a jsonb, a number out of
range) fails every time it is written, so retrying it would hold its whole
batch and the spool hostage. The ledger isolates such a row, writes the rest,
and appends the row here (``dead-letter.jsonl`` in the data directory,
fsynced, one JSON object a line with the error) for an operator to inspect
and, once mended, to load by hand. ``tollway_billing_dead_letter_total``
counts them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import orjson


class UsageRow(Protocol):
    """What is kept of a refused row (``proxy.stores.usage_batch.UsageRow``)."""

    @property
    def values(self) -> tuple[Any, ...]: ...

    def to_json(self) -> bytes: ...


log = logging.getLogger("tollway.ledger")

FILE_NAME = "dead-letter.jsonl"

# What says "this row is bad" rather than "the database is down or busy":
# Postgres's data exceptions (class 22, which asyncpg also raises for an
# argument it cannot encode) and integrity violations (class 23), and the
# Python errors encoding a value can raise (a lone surrogate, an int too big).
_REFUSALS = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    ValueError,
    TypeError,
    ArithmeticError,
)


def is_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is about the rows written, so writing them again fails again."""
    return isinstance(exc, _REFUSALS)


def describe(exc: BaseException) -> str:
    """The error's class and SQLSTATE, never the refused values."""
    state = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__} (SQLSTATE {state})" if state else type(exc).__name__


class DeadLetters:
    def __init__(self, directory: Path, worker_id: str) -> None:
        self.path = directory / FILE_NAME
        self._worker = worker_id
        self.count = 0

    def keep(self, refused: Sequence[tuple[UsageRow, BaseException]]) -> None:
        """Append the rows durably (one write, then fsync) and log one line."""
        if not refused:
            return
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        lines = b"".join(self._line(row, exc, at) for row, exc in refused)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_APPEND: workers sharing the data directory append whole writes.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, lines)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.count += len(refused)
        log.error(
            "Postgres refused %d usage row(s) for their content (%s); kept in %s, "
            "the rest of the batch is written",
            len(refused),
            describe(refused[0][1]),
            self.path.name,
        )

    def _line(self, row: UsageRow, exc: BaseException, at: str) -> bytes:
        try:
            body = orjson.loads(row.to_json())
        except (orjson.JSONEncodeError, orjson.JSONDecodeError):
            body = {"repr": repr(row.values)[:100_000]}  # not even JSON can hold it
        entry = {"at": at, "worker": self._worker, "error": describe(exc), "row": body}
        return orjson.dumps(entry) + b"\n"
