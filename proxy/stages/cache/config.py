"""The YAML ``cache:`` section: which responses the exact cache keeps.

::

    cache:
      enabled: true              # the default for every model (default: false)
      ttl_s: 600
      scope: tenant              # tenant: one tenant never sees another's entries | shared
      max_entry_bytes: 262144    # bigger responses are not stored
      deterministic_only: true   # only temperature 0 (and n 1) requests are cached
      unset_temperature: false   # true: a request without temperature counts as 0
      hit_billing: request       # request: 1 request, 0 tokens | tokens: the original tokens
      local_ttl_s: 1             # hot entries kept in each process too (0: off)
      local_max_bytes: 33554432  # per process
      models:                    # per public model (globs; first match wins)
        "gpt-4o*": {ttl_s: 3600, scope: shared}
        "claude-*": {enabled: false}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.config.reader import (
    ConfigError,
    boolean,
    glob_match,
    mapping,
    one_of,
    positive_number,
)

SCOPES = ("tenant", "shared")
HIT_BILLING = ("request", "tokens")


@dataclass(frozen=True, slots=True)
class ModelCache:
    """What the cache does for one public model."""

    enabled: bool
    ttl_s: float
    scope: str


@dataclass(frozen=True, slots=True)
class _Rule:
    pattern: str
    enabled: bool | None
    ttl_s: float | None
    scope: str | None


@dataclass(frozen=True, slots=True)
class CachePolicy:
    enabled: bool = False
    ttl_s: float = 300.0
    scope: str = "tenant"
    max_entry_bytes: int = 256 * 1024
    deterministic_only: bool = True
    unset_temperature: bool = False
    hit_billing: str = "request"
    # Each process keeps entries it read or wrote for up to local_ttl_s (never
    # past their TTL), so hot keys skip the Redis round trip; an entry deleted
    # from Redis (FLUSHALL, a purge) may be served that much longer.
    local_ttl_s: float = 1.0
    local_max_bytes: int = 32 * 1024 * 1024
    models: tuple[_Rule, ...] = ()

    @property
    def active(self) -> bool:
        """Whether any model may be cached (else the cache is never consulted)."""
        return self.enabled or any(r.enabled for r in self.models)

    def for_model(self, model: str) -> ModelCache:
        rule = next((r for r in self.models if glob_match(r.pattern, model)), None)
        if rule is None:
            return ModelCache(self.enabled, self.ttl_s, self.scope)
        return ModelCache(
            self.enabled if rule.enabled is None else rule.enabled,
            self.ttl_s if rule.ttl_s is None else rule.ttl_s,
            self.scope if rule.scope is None else rule.scope,
        )


_KEYS = tuple(f for f in CachePolicy.__dataclass_fields__)
_RULE_KEYS = ("enabled", "ttl_s", "scope")


def _rule(pattern: str, raw: Any) -> _Rule:
    path = f"cache.models.{pattern}"
    mapping(raw, path, _RULE_KEYS, f"must be a mapping of {', '.join(_RULE_KEYS)}")
    return _Rule(
        pattern,
        boolean(raw["enabled"], f"{path}.enabled") if "enabled" in raw else None,
        positive_number(raw["ttl_s"], f"{path}.ttl_s") if "ttl_s" in raw else None,
        one_of(raw["scope"], f"{path}.scope", SCOPES) if "scope" in raw else None,
    )


def parse_cache(raw: Any) -> CachePolicy:
    if raw is None:
        return CachePolicy()
    if not isinstance(raw, dict):
        raise ConfigError("cache: must be a mapping")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"cache.{key}"
        if key not in _KEYS:
            raise ConfigError(f"{path}: unknown key (allowed: {', '.join(_KEYS)})")
        if key in ("enabled", "deterministic_only", "unset_temperature"):
            values[key] = boolean(value, path)
        elif key == "ttl_s":
            values[key] = positive_number(value, path)
        elif key == "local_ttl_s":
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{path}: must be a number >= 0")
            values[key] = float(value)
        elif key in ("max_entry_bytes", "local_max_bytes"):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{path}: must be a positive integer")
            values[key] = value
        elif key == "scope":
            values[key] = one_of(value, path, SCOPES)
        elif key == "hit_billing":
            values[key] = one_of(value, path, HIT_BILLING)
        else:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: must be a mapping of model (glob) -> settings")
            values[key] = tuple(_rule(str(k), v) for k, v in value.items())
    return CachePolicy(**values)
