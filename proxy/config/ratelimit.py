"""The YAML ``ratelimit:`` section: shared-limit settings and provider limits.

Per-key limits come from the tiers (``requests_per_hour``,
``tokens_per_minute``); this section says how many Tollway processes share
them (for the per-process fallback while Redis is unreachable) and what each
provider, or one provider model (a target, ``provider/model``), accepts::

    ratelimit:
      expected_instances: 4          # Tollway processes in all (workers x hosts)
      providers:
        openai: {rpm: 3000, tpm: 1000000, max_concurrency: 100}
        openai/gpt-4o: {rpm: 500}    # one target, on top of its provider's limits
      auth_failures: {max_failures: 20, window_s: 60}   # per client address
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.config.reader import ConfigError, mapping


@dataclass(frozen=True, slots=True)
class ProviderLimit:
    rpm: int | None = None  # requests per rolling minute
    tpm: int | None = None  # tokens per rolling minute (prompt estimate + max_tokens)
    max_concurrency: int | None = None  # requests in flight, streams until closed


@dataclass(frozen=True, slots=True)
class AuthFailurePolicy:
    """Failed authentications one client address may make in a rolling window
    before its requests get a 429 (``auth_guard``)."""

    max_failures: int = 20
    window_s: float = 60.0  # rounded to a multiple of 0.6 s (the limiter's slots)


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    # Tollway processes sharing the limits. While Redis is unreachable each
    # process admits limit // expected_instances (at least 1) on its own.
    expected_instances: int = 1
    providers: Mapping[str, ProviderLimit] = field(default_factory=dict)
    auth_failures: AuthFailurePolicy = field(default_factory=AuthFailurePolicy)


_KEYS = ("expected_instances", "providers", "auth_failures")
_AUTH_KEYS = ("max_failures", "window_s")
_PROVIDER_KEYS = tuple(ProviderLimit.__dataclass_fields__)


def _positive(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{path}: must be a positive integer")
    return value


def _provider_limit(raw: Any, path: str) -> ProviderLimit:
    mapping(raw, path, _PROVIDER_KEYS, f"must be a mapping of {', '.join(_PROVIDER_KEYS)}")
    return ProviderLimit(
        **{k: None if v is None else _positive(v, f"{path}.{k}") for k, v in raw.items()}
    )


def _auth_failures(raw: Any) -> AuthFailurePolicy:
    path = "ratelimit.auth_failures"
    if raw is None:
        return AuthFailurePolicy()
    mapping(raw, path, _AUTH_KEYS, f"must be a mapping of {', '.join(_AUTH_KEYS)}")
    window = raw.get("window_s", 60)
    if isinstance(window, bool) or not isinstance(window, int | float) or window <= 0:
        raise ConfigError(f"{path}.window_s: must be a number > 0")
    return AuthFailurePolicy(
        max_failures=_positive(raw.get("max_failures", 20), f"{path}.max_failures"),
        window_s=float(window),
    )


def parse_ratelimit(raw: Any, providers: Mapping[str, object]) -> RateLimitPolicy:
    """``providers`` are the configured provider names a limit may refer to."""
    if raw is None:
        return RateLimitPolicy()
    mapping(raw, "ratelimit", _KEYS)
    instances = _positive(raw.get("expected_instances", 1), "ratelimit.expected_instances")
    limits: dict[str, ProviderLimit] = {}
    given = raw.get("providers") or {}
    if not isinstance(given, dict):
        raise ConfigError("ratelimit.providers: must be a mapping of provider -> limits")
    for name, value in given.items():
        path = f"ratelimit.providers.{name}"
        provider = str(name).split("/", 1)[0]
        if provider not in providers:
            raise ConfigError(f"{path}: unknown provider {provider!r}")
        limits[str(name)] = _provider_limit(value, path)
    return RateLimitPolicy(
        expected_instances=instances,
        providers=limits,
        auth_failures=_auth_failures(raw.get("auth_failures")),
    )
