"""The access line skips the redaction scan only when it could change
nothing: what is written is always what the redactor would leave."""

from __future__ import annotations

from typing import Any

import orjson

from proxy.core import redact
from proxy.core.record import AttemptRecord, UsageRecord
from proxy.core.usage import Usage
from proxy.stages.settle import access_log
from proxy.stages.settle.access_log import AccessLog, line


class Lines:
    """The access log's line writer, keeping what it was given."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def add(self, data: bytes) -> None:
        self.lines.append(data)


def _observed(log: AccessLog, writer: Lines, record: UsageRecord, cost: float | None) -> None:
    """Write the record's line and check it is the scrubbed one, byte for
    byte but the timestamp (which moves between the two lines)."""
    log.observe(record, cost)
    expected = redact.scrub_bytes(line(record, cost))
    got = writer.lines[-1]
    assert orjson.loads(got) | {"ts": ""} == orjson.loads(expected) | {"ts": ""}


def test_a_line_is_written_as_the_redactor_would_leave_it() -> None:
    """Lines whose strings hold no secret and no secret's shape skip the
    scrub; every other is scrubbed: either way the written line is the
    scrubbed one, byte for byte."""
    redact.remember("remembered-secret-value-123")
    writer = Lines()
    log = AccessLog(writer)  # type: ignore[arg-type]
    variants: list[dict[str, Any]] = [
        {},
        {"public_model": "sk-" + "A1b2C3d4E5f6G7h8J9k0"},
        {"request_id": "Bearer abc123XYZ987tok"},
        {"provider_model": "http://user:pass1234@host/x"},
        {"served_model": "model?key=AIzaSyA1234567890abcdefghijklmnopqrstu"},
        {"tenant": "acme remembered-secret-value-123"},
        {"error_code": "api_key: a1B2c3D4e5F6g7H8"},
        {"key_prefix": "tw-abc1234"},
        {"public_model": "plain-model", "provider": "fake"},
    ]
    for fields in variants:
        record = UsageRecord("req_1", "chat", public_model="gpt-x", provider="fake")
        record.usage = Usage(3, 4, source="provider")
        record.attempt_log.append(AttemptRecord("fake", "gpt-x", 200))
        for name, value in fields.items():
            setattr(record, name, value)
        _observed(log, writer, record, None)
    assert b"remembered-secret-value-123" not in b"".join(writer.lines)
    assert b"A1b2C3d4E5f6G7h8J9k0" not in b"".join(writer.lines)


def test_a_billed_line_skips_the_scrub_only_when_its_key_prefix_could_change_nothing() -> None:
    """A billed request's line holds its key's display prefix ("tw-" + 7),
    the key shape's trigger: it no longer sends every billed line through the
    scrub, but a prefix holding a remembered value or another shape's trigger
    still does, and the written line is the scrubbed one either way."""
    redact.remember("tw-Ab3_x9")  # a remembered value that fits inside a prefix
    writer = Lines()
    log = AccessLog(writer)  # type: ignore[arg-type]
    cases = {
        "tw-Q7xk_2a": True,  # a display prefix: nothing to scrub
        "tw-Ab3_x9Z": False,  # holds a remembered value
        "tw-apikey1": False,  # its tail holds another shape's trigger
        "tw-" + "Q7xk_2a" * 6 + "Q": False,  # a whole key (43 characters after "tw-")
        "tw-Q7x": False,  # not a display prefix: checked as any string
    }
    for prefix, clean in cases.items():
        record = UsageRecord("req_1", "chat", public_model="gpt-x", provider="fake")
        record.usage = Usage(3, 4, source="provider")
        record.tenant, record.key_prefix = "acme", prefix
        assert access_log._clean(record) is clean, prefix
        _observed(log, writer, record, 0.0)
    written = b"".join(writer.lines)
    assert b"tw-Ab3_x9Z" not in written and b"Q7xk_2aQ7xk_2aQ7xk_2aQ7xk_2aQ7xk_2a" not in written
    assert b'"key_prefix":"tw-Q7xk_2a"' in written
