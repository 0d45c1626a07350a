"""What a semantic match may differ in (only the last user message's wording)
and which requests never take part.

The namespace is the exact cache's fingerprint of the request with the last
message left out: the public model (the model group), the system prompt,
every earlier turn, tools, tool choice, response format and every sampling
parameter are hashed, so a hit can only come from an entry made in the same
conversation state. The scope (the tenant) is part of the store's key too.
Only the last user message's text is embedded and compared.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.stages.cache.store import HEADER, fingerprint
from proxy.stages.semcache.config import SemanticPolicy

MAX_TEXT = 8192  # characters of the last user message that are embedded


@dataclass(frozen=True, slots=True)
class Question:
    namespace: bytes
    text: str


def _text(content: Any) -> str | None:
    """Plain text only: a message with an image or audio part is not compared."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    parts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            return None
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def bypassed(body: Mapping[str, Any], headers: Mapping[str, str], policy: SemanticPolicy) -> bool:
    """``n > 1``, a non-zero temperature (unless ``any_temperature``), or the
    client's ``x-tollway-cache: no-store``. An unset temperature takes part."""
    if (headers.get(HEADER) or "").strip().lower() == "no-store":
        return True
    if body.get("n") not in (None, 1):
        return True
    temperature = body.get("temperature")
    return not policy.any_temperature and temperature not in (None, 0)


def question(body: Mapping[str, Any], endpoint: str, model: str) -> Question | None:
    """The namespace and the text to embed; None when the last turn is not
    a plain-text user message (a tool result, an image, an assistant prefix)."""
    messages = body.get("messages")
    if endpoint != "chat" or not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    text = _text(last.get("content"))
    if not text or not text.strip():
        return None
    rest = {**body, "messages": messages[:-1]}
    digest = fingerprint(endpoint, model, rest)
    return Question(hashlib.sha256(f"semantic:{digest}".encode()).digest(), text[:MAX_TEXT])
