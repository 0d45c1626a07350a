"""The ``models:`` and ``routes:`` sections: the public models, their
targets and fallbacks, and the rules that redirect a request to one."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.config.providers import ProviderConfig, timeout_overrides
from proxy.config.reader import ConfigError, Node
from proxy.config.retry import RetryPolicy, parse_retry

STRATEGIES = ("weighted", "least_in_flight")


@dataclass(frozen=True, slots=True)
class TargetConfig:
    provider: str
    model: str | None = None  # None: pass the requested name through
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    targets: tuple[TargetConfig, ...]
    aliases: tuple[str, ...] = ()
    owned_by: str = "tollway"
    strategy: str = "weighted"  # one of STRATEGIES
    fallbacks: tuple[str, ...] = ()  # public models tried after this one's targets
    # Public models tried, after the rest of the plan, for a request too long
    # for a target's context window (that target is left out).
    context_window_fallbacks: tuple[str, ...] = ()
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeouts: Mapping[str, float] = field(default_factory=dict)  # over the providers' own

    @property
    def is_pattern(self) -> bool:
        return any(c in self.name for c in "*?[")


@dataclass(frozen=True, slots=True)
class RouteRule:
    """``when`` conditions are globs, all of which must match; ``model`` is
    the public model the request is redirected to."""

    model: str
    when_model: str | None = None
    when_headers: Mapping[str, str] = field(default_factory=dict)
    when_tenant: str | None = None
    when_tier: str | None = None
    retry: RetryPolicy | None = None  # None: the model's


_MODEL_KEYS = (
    "name",
    "aliases",
    "targets",
    "owned_by",
    "strategy",
    "fallbacks",
    "context_window_fallbacks",
    "retry",
    "timeouts",
)


def _model(node: Node, providers: Mapping[str, ProviderConfig], retry: RetryPolicy) -> ModelConfig:
    m = node.mapping(_MODEL_KEYS)
    if "name" not in m:
        raise node.fail("missing key 'name'")
    if "targets" not in m:
        raise node.fail("missing key 'targets'")
    targets = _targets(m["targets"], providers)
    aliases = tuple(a.string() for a in m["aliases"].items()) if "aliases" in m else ()
    strategy = m["strategy"].string() if "strategy" in m else "weighted"
    if strategy not in STRATEGIES:
        raise m["strategy"].fail(f"must be one of: {', '.join(STRATEGIES)}")
    return ModelConfig(
        name=m["name"].string(),
        targets=targets,
        aliases=aliases,
        owned_by=m["owned_by"].string() if "owned_by" in m else "tollway",
        strategy=strategy,
        fallbacks=tuple(f.string() for f in m["fallbacks"].items()) if "fallbacks" in m else (),
        context_window_fallbacks=(
            tuple(f.string() for f in m["context_window_fallbacks"].items())
            if "context_window_fallbacks" in m
            else ()
        ),
        retry=parse_retry(m["retry"], retry) if "retry" in m else retry,
        timeouts=timeout_overrides(m["timeouts"]) if "timeouts" in m else {},
    )


def _targets(node: Node, providers: Mapping[str, ProviderConfig]) -> tuple[TargetConfig, ...]:
    targets = []
    for t in node.items():
        tm = t.mapping(("provider", "model", "weight"))
        if "provider" not in tm:
            raise t.fail("missing key 'provider'")
        prov = tm["provider"].string()
        if prov not in providers:
            raise tm["provider"].fail(f"unknown provider {prov!r}")
        targets.append(
            TargetConfig(
                provider=prov,
                model=tm["model"].string() if "model" in tm else None,
                weight=tm["weight"].number(positive=True) if "weight" in tm else 1.0,
            )
        )
    if not targets:
        raise node.fail("must list at least one target")
    return tuple(targets)


def _check_fallbacks(models: list[ModelConfig]) -> None:
    """Fallbacks name existing, non-pattern models and never lead back to themselves."""
    by_name = {n: m for m in models for n in (m.name, *m.aliases)}
    for i, model in enumerate(models):
        named = [("fallbacks", n) for n in model.fallbacks]
        named += [("context_window_fallbacks", n) for n in model.context_window_fallbacks]
        for j, (key, name) in enumerate(named):
            other = by_name.get(name)
            where = f"models[{i}].{key}[{j if key == 'fallbacks' else j - len(model.fallbacks)}]"
            if other is None:
                raise ConfigError(f"{where}: unknown model {name!r}")
            if other.is_pattern:
                raise ConfigError(f"{where}: {name!r} is a pattern; name a model")
    for i, model in enumerate(models):
        loop = _fallback_loop(model, by_name, ())
        if loop:
            raise ConfigError(f"models[{i}].fallbacks: fallback loop {' -> '.join(loop)}")


def _fallback_loop(
    model: ModelConfig, by_name: Mapping[str, ModelConfig], path: tuple[str, ...]
) -> tuple[str, ...] | None:
    if model.name in path:
        return (*path[path.index(model.name) :], model.name)
    for name in model.fallbacks:
        loop = _fallback_loop(by_name[name], by_name, (*path, model.name))
        if loop:
            return loop
    return None


def _route(node: Node, model_retry: Mapping[str, RetryPolicy]) -> RouteRule:
    m = node.mapping(("when", "model", "retry"))
    if "model" not in m:
        raise node.fail("missing key 'model'")
    target = m["model"].string()
    if target not in model_retry:
        raise m["model"].fail(f"unknown model {target!r}")
    when: dict[str, Node] = (
        m["when"].mapping(("model", "headers", "tenant", "tier")) if "when" in m else {}
    )
    return RouteRule(
        model=target,
        when_model=when["model"].string() if "model" in when else None,
        when_headers=(
            {k.lower(): v for k, v in when["headers"].string_map().items()}
            if "headers" in when
            else {}
        ),
        when_tenant=when["tenant"].string() if "tenant" in when else None,
        when_tier=when["tier"].string() if "tier" in when else None,
        retry=parse_retry(m["retry"], model_retry[target]) if "retry" in m else None,
    )


def parse_models(
    node: Node | None, providers: Mapping[str, ProviderConfig], retry: RetryPolicy
) -> tuple[ModelConfig, ...]:
    """The ``models:`` list (``retry``: the top-level policy each model's
    overrides); names and aliases unique, fallbacks checked."""
    models: list[ModelConfig] = []
    seen: dict[str, str] = {}
    for item in node.items() if node is not None else iter(()):
        model = _model(item, providers, retry)
        for n in (model.name, *model.aliases):
            if n in seen:
                raise ConfigError(f"{item.path}: duplicate model name {n!r} (also {seen[n]})")
            seen[n] = item.path
        models.append(model)
    _check_fallbacks(models)
    return tuple(models)


def parse_routes(node: Node | None, models: tuple[ModelConfig, ...]) -> tuple[RouteRule, ...]:
    """The ``routes:`` list; a rule's ``retry`` overrides its target model's."""
    model_retry = {n: m.retry for m in models for n in (m.name, *m.aliases)}
    return tuple(_route(item, model_retry) for item in (node.items() if node is not None else ()))
