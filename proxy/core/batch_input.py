"""A batch input file (JSONL), checked line by line.

Each line is one request: ``{"custom_id", "method": "POST", "url", "body"}``,
as OpenAI's Batch API takes it. Every problem names its 1-based line, so a
client can fix its file: the Files API refuses an upload at its first bad
line, and a batch whose lines do not fit its endpoint is ``failed`` with
one error per bad line (at most ``MAX_ERRORS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/completions")
# The pipeline's name for each endpoint a batch may target.
PIPELINE: dict[str, Literal["chat", "completions", "embeddings"]] = {
    "/v1/chat/completions": "chat",
    "/v1/embeddings": "embeddings",
    "/v1/completions": "completions",
}
MAX_ERRORS = 20


@dataclass(frozen=True, slots=True)
class InputLine:
    line: int  # 1-based
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LineError:
    line: int
    code: str
    message: str
    param: str | None = None

    def as_openai(self) -> dict[str, Any]:
        """OpenAI's ``BatchError``."""
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


def read(content: bytes, max_lines: int) -> tuple[list[InputLine], list[LineError]]:
    """The lines that parse, and the errors of those that do not (blank
    lines are skipped; a duplicate ``custom_id`` is an error)."""
    lines: list[InputLine] = []
    errors: list[LineError] = []
    seen: set[str] = set()
    for number, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue
        if len(lines) + len(errors) >= max_lines:
            errors.append(LineError(number, "too_many_lines", f"More than {max_lines} lines."))
            break
        parsed = _line(number, raw, seen)
        if isinstance(parsed, LineError):
            errors.append(parsed)
            if len(errors) >= MAX_ERRORS:
                break
        else:
            seen.add(parsed.custom_id)
            lines.append(parsed)
    if not lines and not errors:
        errors.append(LineError(0, "empty_file", "The file holds no request lines."))
    return lines, errors


def _line(number: int, raw: bytes, seen: set[str]) -> InputLine | LineError:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return LineError(number, "invalid_json", f"Line {number} is not valid JSON.")
    if not isinstance(obj, dict):
        return LineError(number, "invalid_request", f"Line {number} is not a JSON object.")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
        return _bad(number, "custom_id", "a non-empty string of at most 512 characters")
    if custom_id in seen:
        return LineError(
            number,
            "duplicate_custom_id",
            f"Line {number}: custom_id {custom_id!r} is used by an earlier line.",
            "custom_id",
        )
    if obj.get("method") != "POST":
        return _bad(number, "method", '"POST"')
    url = obj.get("url")
    if url not in ENDPOINTS:
        return _bad(number, "url", "one of " + ", ".join(ENDPOINTS))
    body = obj.get("body")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return _bad(number, "body", 'an object with a "model"')
    return InputLine(number, custom_id, str(url), body)


def _bad(number: int, field: str, wanted: str) -> LineError:
    return LineError(number, "invalid_request", f"Line {number}: {field} must be {wanted}.", field)
