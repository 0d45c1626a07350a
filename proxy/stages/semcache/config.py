"""The YAML ``semantic_cache:`` section.

::

    semantic_cache:
      enabled: true                 # the default for every model (default: false)
      embedding_model: text-embedding-3-small   # a model of this config that serves embeddings
      threshold: 0.95               # cosine similarity a hit needs (0 < t <= 1)
      ttl_s: 3600
      max_entries_per_tenant: 10000 # the sweeper evicts the least recently used past it
      embedding_timeout_s: 0.5      # slower than this: the request is a miss
      embedding_billing: gateway    # gateway | tenant: who the embedding call's usage row names
      hit_billing: request          # request: 1 request, 0 tokens | tokens: the original tokens
      any_temperature: false        # true: temperature > 0 may be served from the cache too
      sweep_interval_s: 30
      models:                       # per public model (globs; first match wins)
        "gpt-4o*": {threshold: 0.97}
        "claude-*": {enabled: false}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.config.model import Config
from proxy.config.reader import (
    ConfigError,
    boolean,
    glob_match,
    mapping,
    one_of,
    positive_number,
)

BILL_TO = ("gateway", "tenant")
HIT_BILLING = ("request", "tokens")


@dataclass(frozen=True, slots=True)
class ModelRule:
    pattern: str
    enabled: bool | None = None
    threshold: float | None = None
    ttl_s: float | None = None


@dataclass(frozen=True, slots=True)
class ForModel:
    enabled: bool
    threshold: float
    ttl_s: float


@dataclass(frozen=True, slots=True)
class SemanticPolicy:
    embedding_model: str = ""
    enabled: bool = False
    threshold: float = 0.95
    ttl_s: float = 3600.0
    max_entries_per_tenant: int = 10_000
    embedding_timeout_s: float = 0.5
    embedding_billing: str = "gateway"
    hit_billing: str = "request"
    any_temperature: bool = False
    sweep_interval_s: float = 30.0
    models: tuple[ModelRule, ...] = ()

    @property
    def active(self) -> bool:
        return self.enabled or any(r.enabled for r in self.models)

    def for_model(self, model: str) -> ForModel:
        rule = next((r for r in self.models if glob_match(r.pattern, model)), ModelRule(""))
        return ForModel(
            self.enabled if rule.enabled is None else rule.enabled,
            self.threshold if rule.threshold is None else rule.threshold,
            self.ttl_s if rule.ttl_s is None else rule.ttl_s,
        )


_KEYS = tuple(SemanticPolicy.__dataclass_fields__)
_RULE_KEYS = ("enabled", "threshold", "ttl_s")


def _threshold(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(f"{path}: must be a cosine similarity in (0, 1]")
    return float(value)


def _rule(pattern: str, raw: Any) -> ModelRule:
    path = f"semantic_cache.models.{pattern}"
    mapping(raw, path, _RULE_KEYS, f"must be a mapping of {', '.join(_RULE_KEYS)}")
    return ModelRule(
        pattern,
        boolean(raw["enabled"], f"{path}.enabled") if "enabled" in raw else None,
        _threshold(raw["threshold"], f"{path}.threshold") if "threshold" in raw else None,
        positive_number(raw["ttl_s"], f"{path}.ttl_s") if "ttl_s" in raw else None,
    )


def _value(key: str, value: Any, config: Config) -> Any:
    path = f"semantic_cache.{key}"
    if key in ("enabled", "any_temperature"):
        return boolean(value, path)
    if key in ("ttl_s", "embedding_timeout_s", "sweep_interval_s"):
        return positive_number(value, path)
    if key == "threshold":
        return _threshold(value, path)
    if key == "max_entries_per_tenant":
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{path}: must be a positive integer")
        return value
    if key == "embedding_billing":
        return one_of(value, path, BILL_TO)
    if key == "hit_billing":
        return one_of(value, path, HIT_BILLING)
    if key == "embedding_model":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: must be the name of a model of this config")
        if not any(glob_match(m.name, value) or value in m.aliases for m in config.models):
            raise ConfigError(f"{path}: no model {value!r} in models:")
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: must be a mapping of model (glob) -> settings")
    return tuple(_rule(str(k), v) for k, v in value.items())


def parse_semantic(raw: Any, config: Config) -> SemanticPolicy:
    if raw is None:
        return SemanticPolicy()
    if not isinstance(raw, dict):
        raise ConfigError("semantic_cache: must be a mapping")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _KEYS:
            raise ConfigError(f"semantic_cache.{key}: unknown key (allowed: {', '.join(_KEYS)})")
        values[key] = _value(key, value, config)
    policy = SemanticPolicy(**values)
    if policy.active and not policy.embedding_model:
        raise ConfigError("semantic_cache.embedding_model: required when the cache is enabled")
    return policy
