"""Token usage as the settle stage receives it, for every request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

UsageSource = Literal["provider", "estimated", "none"]


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    source: UsageSource = "none"
    # Provider-specific extras kept for the usage event (cache reads, reasoning).
    details: dict[str, int] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "source": self.source,
        }


NO_USAGE = Usage()


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_from_openai(obj: Any) -> Usage | None:
    """Read an OpenAI ``usage`` object; None when absent or not a mapping."""
    if not isinstance(obj, dict):
        return None
    details: dict[str, int] = {}
    for key in ("prompt_tokens_details", "completion_tokens_details"):
        sub = obj.get(key)
        if isinstance(sub, dict):
            for k, v in sub.items():
                if _int(v):
                    details[k] = _int(v)
    return Usage(
        prompt_tokens=_int(obj.get("prompt_tokens")),
        completion_tokens=_int(obj.get("completion_tokens")),
        source="provider",
        details=details,
    )


def usage_from_responses(obj: Any) -> Usage | None:
    """Read an OpenAI Responses API ``usage`` object (``input_tokens``,
    ``output_tokens`` and their details; cached tokens are part of the
    input, as chat's prompt tokens include them); None when absent."""
    if not isinstance(obj, dict):
        return None
    return usage_from_openai(
        {
            "prompt_tokens": obj.get("input_tokens"),
            "completion_tokens": obj.get("output_tokens"),
            "prompt_tokens_details": obj.get("input_tokens_details"),
            "completion_tokens_details": obj.get("output_tokens_details"),
        }
    )
