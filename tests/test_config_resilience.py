"""Config for retries, fallbacks, strategies and breakers: strict, with key paths."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from proxy.config.model import BreakerPolicy, Config, ConfigError, RetryPolicy
from proxy.pipeline.registry import parse_config

BASE: dict[str, Any] = {
    "retry": {"max_attempts": 4, "deadline_s": 30},
    "providers": {
        "p": {
            "kind": "openai",
            "base_url": "http://127.0.0.1:1/v1",
            "breaker": {"failures": 3, "cooldown_s": 5, "max_cooldown_s": 50, "trip_on_429": True},
        },
        "q": {"kind": "openai", "base_url": "http://127.0.0.1:2/v1"},
    },
    "models": [
        {
            "name": "a",
            "aliases": ["a1"],
            "strategy": "least_in_flight",
            "fallbacks": ["b"],
            "retry": {"backoff_base_ms": 50, "retry_on_429": False},
            "timeouts": {"first_byte": 5},
            "targets": [{"provider": "p"}, {"provider": "q"}],
        },
        {"name": "b", "fallbacks": ["c"], "targets": [{"provider": "q"}]},
        {"name": "c", "targets": [{"provider": "p"}]},
        {"name": "g-*", "targets": [{"provider": "p"}]},
    ],
    "routes": [{"when": {"headers": {"x-fast": "1"}}, "model": "a1", "retry": {"max_attempts": 1}}],
}


def _parse(cfg: dict[str, Any]) -> Config:
    return parse_config(yaml.safe_dump(cfg), {})


def _broken(path: list[Any], value: Any) -> dict[str, Any]:
    cfg = yaml.safe_load(yaml.safe_dump(BASE))
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return cfg


def test_levels_override_key_by_key() -> None:
    cfg = _parse(BASE)
    assert cfg.retry == RetryPolicy(max_attempts=4, deadline_s=30)
    a, b = cfg.models[0], cfg.models[1]
    assert a.retry == RetryPolicy(
        max_attempts=4, deadline_s=30, backoff_base_ms=50, retry_on_429=False
    )
    assert b.retry == cfg.retry  # no retry: of its own
    assert cfg.routes[0].retry == RetryPolicy(
        max_attempts=1, deadline_s=30, backoff_base_ms=50, retry_on_429=False
    )
    assert (a.strategy, a.fallbacks, dict(a.timeouts)) == (
        "least_in_flight",
        ("b",),
        {"first_byte": 5},
    )
    assert cfg.providers["p"].breaker == BreakerPolicy(3, 5, 50, True)
    assert cfg.providers["q"].breaker == BreakerPolicy()


def test_defaults_without_any_of_it() -> None:
    cfg = _parse({"providers": {"e": {"kind": "echo"}}, "models": []})
    assert cfg.retry == RetryPolicy()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["retry", "max_attempts"], 0, "retry.max_attempts: must be > 0"),
        (["retry", "max_attempts"], 1.5, "retry.max_attempts: must be an integer"),
        (["retry", "deadline_s"], 0, "retry.deadline_s: must be > 0"),
        (["retry", "backoff_base_ms"], -1, "retry.backoff_base_ms: must be >= 0"),
        (["retry", "retry_on_429"], "yes", "retry.retry_on_429: must be true or false"),
        (["retry", "jitter"], "full", "retry.jitter: unknown key"),
        (
            ["retry", "backoff_max_ms"],
            10,
            "retry: backoff_max_ms must be >= backoff_base_ms",
        ),
        (["models", 0, "strategy"], "random", "models[0].strategy: must be one of: weighted"),
        (["models", 0, "retry", "max_attempts"], -2, "models[0].retry.max_attempts: must be > 0"),
        (["models", 0, "timeouts", "idle"], 0, "models[0].timeouts.idle: must be > 0"),
        (["models", 0, "timeouts", "read"], 1, "models[0].timeouts.read: unknown key"),
        (["models", 0, "fallbacks"], "b", "models[0].fallbacks: must be a list"),
        (["models", 0, "fallbacks"], ["zz"], "models[0].fallbacks[0]: unknown model 'zz'"),
        (["models", 0, "fallbacks"], ["g-*"], "models[0].fallbacks[0]: 'g-*' is a pattern"),
        (["models", 0, "fallbacks"], ["a"], "models[0].fallbacks: fallback loop a -> a"),
        (["models", 2, "fallbacks"], ["a1"], "models[0].fallbacks: fallback loop a -> b -> c -> a"),
        (["providers", "p", "breaker", "failures"], 0, "providers.p.breaker.failures: must be > 0"),
        (
            ["providers", "p", "breaker", "max_cooldown_s"],
            1,
            "providers.p.breaker: max_cooldown_s must be >= cooldown_s",
        ),
        (["providers", "p", "breaker", "halfopen"], 1, "providers.p.breaker.halfopen: unknown key"),
        (
            ["routes", 0, "retry", "deadline_s"],
            "1m",
            "routes[0].retry.deadline_s: must be a number",
        ),
    ],
)
def test_invalid_configs_name_the_key_path(path: list[Any], value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _parse(_broken(path, value))
    assert str(exc.value).startswith(message)
