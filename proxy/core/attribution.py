"""Who a request was for: OpenAI's ``user`` field, its tags, for the usage row.

Tags come from OpenAI's ``metadata`` body field (at most 16 pairs, keys up
to 64 characters, string values up to 512, as OpenAI bounds it) and from an
``x-tollway-tags`` header (comma-separated, at most 16 tags of 1-64
characters from ``[A-Za-z0-9._:/=-]``). Both are client-chosen, so they are
bounded here and refused with a 400 naming the field, never truncated
silently; they are stored, never used as metric labels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from proxy.core.errors import InvalidRequest

MAX_USER = 256
MAX_PAIRS = 16
MAX_KEY = 64
MAX_VALUE = 512
MAX_TAGS = 16
TAGS_HEADER = "x-tollway-tags"
_TAG = re.compile(r"[A-Za-z0-9._:/=-]{1,64}")


def end_user(body: Mapping[str, Any]) -> str | None:
    user = body.get("user")
    if user is None:
        return None
    if not isinstance(user, str) or len(user) > MAX_USER:
        raise InvalidRequest(
            f"'user' must be a string of at most {MAX_USER} characters.", param="user"
        )
    return user or None


def tags(body: Mapping[str, Any], headers: Mapping[str, str]) -> dict[str, Any] | None:
    """``{"metadata": {...}, "tags": [...]}`` with what the request carried, or None."""
    out: dict[str, Any] = {}
    metadata = _metadata(body.get("metadata"))
    if metadata:
        out["metadata"] = metadata
    header = headers.get(TAGS_HEADER)
    if header is not None:
        listed = _tags(header)
        if listed:
            out["tags"] = listed
    return out or None


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    bad = InvalidRequest(
        f"'metadata' must be an object of at most {MAX_PAIRS} string values "
        f"(keys up to {MAX_KEY} characters, values up to {MAX_VALUE}).",
        param="metadata",
    )
    if not isinstance(value, dict) or len(value) > MAX_PAIRS:
        raise bad
    for k, v in value.items():
        if not (0 < len(k) <= MAX_KEY) or not isinstance(v, str) or len(v) > MAX_VALUE:
            raise bad
    return value


def _tags(header: str) -> list[str]:
    listed = [t.strip() for t in header.split(",") if t.strip()]
    if len(listed) > MAX_TAGS or not all(_TAG.fullmatch(t) for t in listed):
        raise InvalidRequest(
            f"The {TAGS_HEADER} header takes at most {MAX_TAGS} comma-separated tags of "
            "1-64 characters from A-Z a-z 0-9 . _ : / = -.",
            code="invalid_tags",
        )
    return list(dict.fromkeys(listed))  # in order, once each
