"""Model families from the YAML ``model_families:`` section, over shipped defaults.

A family says two things about the models a provider serves: which
token-limit parameter they accept (OpenAI's o-series and GPT-5 refuse
``max_tokens`` with 400 ``unsupported_parameter`` and take
``max_completion_tokens``), and how many tokens fit in their context window.
Entries are matched against the provider's model name or ``provider/model``
(globs, first match wins); the YAML's entries come before the shipped ones::

    model_families:
      - models: ["my-o3-deployment", "azure/reasoner-*"]
        token_limit: max_completion_tokens
        context_window: 200000

A model no entry matches takes ``max_tokens`` and has no known window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.config.reader import ConfigError, glob_match, mapping

TOKEN_LIMITS = ("max_tokens", "max_completion_tokens")


@dataclass(frozen=True, slots=True)
class Family:
    models: tuple[str, ...]  # globs over the provider model name or "provider/model"
    token_limit: str = "max_tokens"  # one of TOKEN_LIMITS
    context_window: int | None = None  # prompt + completion tokens; None: unknown

    def matches(self, provider: str, model: str) -> bool:
        key = f"{provider}/{model}"
        return any(glob_match(p, model) or glob_match(p, key) for p in self.models)


UNKNOWN = Family(("*",))

# Shipped defaults (OpenAI, Anthropic and Google model pages, 2025-06).
# Specific names before their family's glob: the first match wins.
DEFAULT_FAMILIES: tuple[Family, ...] = (
    Family(("o1-mini*",), "max_completion_tokens", 128_000),
    Family(("o1*", "o3*", "o4*"), "max_completion_tokens", 200_000),
    Family(("gpt-5*",), "max_completion_tokens", 400_000),
    Family(("gpt-4.1*",), "max_tokens", 1_047_576),
    Family(("gpt-4o*", "gpt-4-turbo*"), "max_tokens", 128_000),
    Family(("gpt-3.5-turbo*",), "max_tokens", 16_385),
    Family(("claude-*",), "max_tokens", 200_000),
    Family(("gemini-1.5-pro*",), "max_tokens", 2_097_152),
    Family(("gemini-*",), "max_tokens", 1_048_576),
)

_KEYS = ("models", "token_limit", "context_window")


def _family(raw: Any, path: str) -> Family:
    mapping(raw, path, _KEYS, "must be a mapping with models, token_limit, context_window")
    models = raw.get("models")
    if (
        not isinstance(models, list)
        or not models
        or not all(isinstance(m, str) and m for m in models)
    ):
        raise ConfigError(f"{path}.models: must be a non-empty list of model names or globs")
    limit = raw.get("token_limit", "max_tokens")
    if limit not in TOKEN_LIMITS:
        raise ConfigError(f"{path}.token_limit: must be one of: {', '.join(TOKEN_LIMITS)}")
    window = raw.get("context_window")
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, int) or window <= 0
    ):
        raise ConfigError(f"{path}.context_window: must be a positive integer or null")
    return Family(tuple(models), limit, window)


def parse_families(raw: Any) -> tuple[Family, ...]:
    """The YAML's families, then the shipped ones."""
    if raw is None:
        return DEFAULT_FAMILIES
    if not isinstance(raw, list):
        raise ConfigError("model_families: must be a list of {models, token_limit, context_window}")
    own = tuple(_family(item, f"model_families[{i}]") for i, item in enumerate(raw))
    return (*own, *DEFAULT_FAMILIES)


def family_of(families: tuple[Family, ...], provider: str, model: str) -> Family:
    return next((f for f in families if f.matches(provider, model)), UNKNOWN)
