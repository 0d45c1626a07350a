"""OpenAI's ``/v1/moderations`` shape (``omni-moderation-latest``): its
categories, and a result built from scores (the echo provider's answers).

A moderation answer holds one result per input, each with ``flagged``, a
boolean per category (the provider's own threshold), a score per category
in [0, 1], and the input types each score applies to.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
DEFAULT_MODEL = "omni-moderation-latest"
FLAG_AT = 0.5  # where the echo provider's booleans switch
_FLOOR = 1e-6  # a real model never says exactly 0


def result(scores: Mapping[str, float]) -> dict[str, Any]:
    """One result object: every category, ``scores`` where given."""
    full = {c: float(scores.get(c, _FLOOR)) for c in CATEGORIES}
    flags = {c: s >= FLAG_AT for c, s in full.items()}
    return {
        "flagged": any(flags.values()),
        "categories": flags,
        "category_scores": full,
        "category_applied_input_types": {c: ["text"] for c in CATEGORIES},
    }


def inputs(body: Mapping[str, Any]) -> list[str]:
    """The texts of a moderation request's ``input``: a string, a list of
    strings, or a list of ``{"type": "text", "text": ...}`` parts (image
    parts carry no text)."""
    raw = body.get("input")
    items = raw if isinstance(raw, list) else [raw]
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            out.append(item["text"])
    return out
