"""Route plans: rules, aliases, globs, weights (deterministic under a seed)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
import yaml

from proxy.config.tiers import Tier
from proxy.core.errors import ModelNotAllowed, ModelNotFound, ProviderNotConfigured
from proxy.pipeline.registry import parse_config
from proxy.stages.route import RoutePlan, Router

CFG: dict[str, Any] = {
    "providers": {
        "a": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1"},
        "b": {"kind": "openai", "base_url": "http://127.0.0.1:2/v1"},
        "off": {"kind": "openai", "base_url": "http://127.0.0.1:3/v1", "api_key": "${K:-}"},
    },
    "models": [
        {
            "name": "split",
            "aliases": ["s"],
            "targets": [
                {"provider": "a", "model": "a-model", "weight": 3},
                {"provider": "b", "model": "b-model", "weight": 1},
            ],
        },
        {"name": "llama-*", "targets": [{"provider": "b"}]},
        {"name": "dark", "targets": [{"provider": "off"}]},
        {"name": "premium", "targets": [{"provider": "a", "model": "big"}]},
    ],
    "routes": [
        {"when": {"headers": {"x-team": "research*"}, "model": "split"}, "model": "premium"},
        {"when": {"tier": "enterprise"}, "model": "premium"},
    ],
}


def _router(seed: int = 1) -> Router:
    return Router(parse_config(yaml.safe_dump(CFG), {}), rng=random.Random(seed))


def test_weighted_choice_follows_weights_and_keeps_fallbacks() -> None:
    router = _router()
    firsts = Counter()
    for _ in range(4000):
        plan = router.plan("split", {})
        assert len(plan.targets) == 2  # the other target is the fallback
        firsts[plan.targets[0].provider.name] += 1
    assert 0.72 < firsts["a"] / 4000 < 0.78  # weight 3 of 4


def test_same_seed_same_plans() -> None:
    a, b = _router(7), _router(7)
    assert [a.plan("split", {}).targets[0].model for _ in range(20)] == [
        b.plan("split", {}).targets[0].model for _ in range(20)
    ]


def test_alias_glob_and_passthrough_name() -> None:
    router = _router()
    assert router.plan("s", {}).public_model == "split"
    plan = router.plan("llama-3.1-70b", {})
    assert plan.targets[0].model == "llama-3.1-70b"


def test_rules_redirect_by_header_and_tier() -> None:
    router = _router()
    assert router.plan("split", {"x-team": "research-ml"}).public_model == "premium"
    assert router.plan("split", {"x-team": "sales"}).public_model == "split"
    assert router.plan("llama-3", {}, tier="enterprise").public_model == "premium"


def test_unknown_and_unconfigured_models() -> None:
    router = _router()
    with pytest.raises(ModelNotFound):
        router.plan("gpt-5", {})
    with pytest.raises(ProviderNotConfigured, match="set K"):
        router.plan("dark", {})
    assert [n for n, _ in router.listed_models()] == ["split", "s", "premium"]


FALLBACK_CFG: dict[str, Any] = {
    "providers": {
        "a": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1", "timeouts": {"idle": 9}},
        "b": {"kind": "openai", "base_url": "http://127.0.0.1:2/v1"},
        "off": {"kind": "openai", "base_url": "http://127.0.0.1:3/v1", "api_key": "${K:-}"},
    },
    "models": [
        {
            "name": "main",
            "targets": [{"provider": "a", "model": "a1"}, {"provider": "b", "model": "b1"}],
            "fallbacks": ["second", "third"],
            "timeouts": {"first_byte": 4},
            "retry": {"max_attempts": 5},
        },
        {
            "name": "second",
            "targets": [{"provider": "off", "model": "x"}, {"provider": "a", "model": "a1"}],
            "fallbacks": ["fourth"],
        },
        {"name": "third", "targets": [{"provider": "b", "model": "b3"}]},
        {"name": "fourth", "targets": [{"provider": "a", "model": "a4"}]},
        {"name": "dark", "targets": [{"provider": "off"}], "fallbacks": ["third"]},
        {"name": "llama-*", "targets": [{"provider": "a"}], "fallbacks": ["third"]},
    ],
    "routes": [{"when": {"headers": {"x-fast": "1"}}, "model": "main", "retry": {"deadline_s": 1}}],
}


def _fallback_router(seed: int = 1) -> Router:
    return Router(parse_config(yaml.safe_dump(FALLBACK_CFG), {}), rng=random.Random(seed))


def test_plan_lists_the_model_then_its_fallbacks_depth_first() -> None:
    plan = _fallback_router().plan("main", {})
    # "second" adds nothing: its a/a1 is already in the plan and its other provider is off.
    assert [g.model for g in plan.groups] == ["main", "fourth", "third"]
    assert {t.key for t in plan.groups[0].targets} == {"a/a1", "b/b1"}
    assert [t.key for g in plan.groups[1:] for t in g.targets] == ["a/a4", "b/b3"]


def test_each_target_keeps_its_own_rewrite_and_timeouts() -> None:
    plan = _fallback_router().plan("main", {})
    by_key = {t.key: t for t in plan.targets}
    assert by_key["a/a1"].timeouts.first_byte == 4 and by_key["a/a1"].timeouts.idle == 9
    assert by_key["b/b1"].timeouts.first_byte == 4  # the model's override, over b's default
    assert by_key["a/a4"].timeouts.first_byte == 120  # a fallback model: its own (none)


def test_fallbacks_serve_a_model_whose_own_providers_are_off() -> None:
    plan = _fallback_router().plan("dark", {})
    assert [t.key for t in plan.targets] == ["b/b3"]
    assert plan.public_model == "dark"


def test_glob_passes_the_name_through_but_fallbacks_keep_theirs() -> None:
    plan = _fallback_router().plan("llama-3", {})
    assert [t.key for t in plan.targets] == ["a/llama-3", "b/b3"]


def test_retry_policy_from_the_rule_else_the_model() -> None:
    router = _fallback_router()
    assert router.plan("main", {}).retry.max_attempts == 5
    fast = router.plan("main", {"x-fast": "1"}).retry
    assert (fast.max_attempts, fast.deadline_s) == (5, 1)
    assert router.plan("third", {}).retry.max_attempts == 3  # the default


def test_plans_are_deterministic_under_a_seed() -> None:
    def keys(seed: int) -> list[list[str]]:
        router = _fallback_router(seed)
        return [[t.key for t in router.plan("main", {}).targets] for _ in range(10)]

    assert keys(3) == keys(3)
    assert len({tuple(k) for k in keys(3)}) == 2  # both draws of the first group occur


TIER_CFG: dict[str, Any] = {
    "providers": {
        "a": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1"},
        "b": {"kind": "openai", "base_url": "http://127.0.0.1:2/v1"},
    },
    "models": [
        {"name": "fast", "targets": [{"provider": "a", "model": "f"}], "fallbacks": ["slow"]},
        {"name": "slow", "targets": [{"provider": "b", "model": "s"}]},
    ],
}


def _tier(*models: str) -> Tier:
    return Tier("t", None, None, None, None, 100, models=models)


def test_a_tiers_plan_is_kept_per_tier_and_model() -> None:
    router = Router(parse_config(yaml.safe_dump(TIER_CFG), {}), rng=random.Random(1))
    narrow, wide = _tier("fast"), _tier("*")

    def plan(tier: Tier, model: str) -> RoutePlan:
        return router.plan(model, {}, tier="t", access=tier)

    first = plan(narrow, "fast")
    assert first == Router(parse_config(yaml.safe_dump(TIER_CFG), {})).plan(
        "fast", {}, tier="t", access=narrow
    )  # as a fresh router plans it
    assert [g.model for g in first.groups] == ["fast"]  # its tier may not use "slow"
    assert plan(narrow, "fast") is first  # the next request reuses it
    assert [g.model for g in plan(wide, "fast").groups] == ["fast", "slow"]  # its own
    equal = _tier("fast")  # an equal tier (a reloaded config's) is asked again
    assert plan(equal, "fast") == first and plan(equal, "fast") is not first
    with pytest.raises(ModelNotAllowed):
        plan(narrow, "slow")
    with pytest.raises(ModelNotAllowed):
        plan(narrow, "slow")  # refusals are not kept as plans
