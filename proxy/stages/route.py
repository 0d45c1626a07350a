"""The route stage: (public model, headers, tenant, tier) → an ordered plan.

Rules in ``routes:`` are tried in order and the first match redirects the
request to another public model. The model is then found by exact name or
alias, else by the first glob pattern that matches (``llama-*``).

The plan is a list of groups: the model's own targets first, then those of
each model named in its ``fallbacks:`` (and theirs, depth first), each
target with its own rewrite (provider, provider model name, timeouts). Within
a group the targets are in weighted random order, drawn without replacement:
the first is the weighted choice, the rest its fallbacks. The live part of
the ordering (breaker health, least-in-flight) is ``balance.arrange``'s. The
plan also carries the retry policy: the matching rule's, else the model's.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from proxy.config.families import Family, family_of
from proxy.config.model import (
    Config,
    ModelConfig,
    ProviderConfig,
    RetryPolicy,
    RouteRule,
    Timeouts,
)
from proxy.config.reader import Glob, compile_glob
from proxy.config.tiers import Tier
from proxy.core.errors import (
    ContextLengthExceeded,
    ModelNotAllowed,
    ModelNotFound,
    ProviderNotConfigured,
)


@dataclass(frozen=True, slots=True)
class Target:
    provider: ProviderConfig
    model: str  # the name sent to the provider
    weight: float = 1.0
    timeouts: Timeouts = field(default_factory=Timeouts)  # the provider's, as the model overrides
    public: str = ""  # the public model this target belongs to (a fallback's own name)
    token_limit: str = "max_tokens"  # the completion-limit parameter the model accepts
    context_window: int | None = None  # None: unknown, never refused for length
    # Identifies the target to the breaker and the in-flight counts; made
    # once here, as it is read several times per request.
    key: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.provider.name}/{self.model}")


@dataclass(frozen=True, slots=True)
class TargetGroup:
    model: str  # the public model these targets serve
    strategy: str
    targets: tuple[Target, ...]


@dataclass(frozen=True, slots=True)
class RoutePlan:
    public_model: str
    groups: tuple[TargetGroup, ...]
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # The model's context_window_fallbacks, used by ``fit`` only.
    overflow: tuple[TargetGroup, ...] = ()

    @property
    def targets(self) -> tuple[Target, ...]:
        return tuple(t for g in self.groups for t in g.targets)


class _Rule:
    """A route rule with its ``when`` globs compiled."""

    __slots__ = ("headers", "model", "rule", "tenant", "tier")

    def __init__(self, rule: RouteRule) -> None:
        self.rule = rule
        self.model = compile_glob(rule.when_model) if rule.when_model is not None else None
        self.headers = [(name, compile_glob(p)) for name, p in rule.when_headers.items()]
        self.tenant = compile_glob(rule.when_tenant) if rule.when_tenant is not None else None
        self.tier = compile_glob(rule.when_tier) if rule.when_tier is not None else None

    def matches(
        self, model: str, headers: Mapping[str, str], tenant: str | None, tier: str | None
    ) -> bool:
        if self.model is not None and not self.model(model):
            return False
        for name, glob in self.headers:
            value = headers.get(name)
            if value is None or not glob(value):
                return False
        if self.tenant is not None and (tenant is None or not self.tenant(tenant)):
            return False
        return self.tier is None or (tier is not None and bool(self.tier(tier)))


def _weighted_order(targets: tuple[Target, ...], rng: random.Random) -> tuple[Target, ...]:
    if len(targets) < 2:
        return targets
    # Efraimidis-Spirakis: key u^(1/w); sorting by it is a weighted draw
    # without replacement.
    return tuple(sorted(targets, key=lambda t: rng.random() ** (1.0 / t.weight), reverse=True))


class Router:
    def __init__(self, config: Config, rng: random.Random | None = None) -> None:
        self._config = config
        self._rng = rng or random.Random()
        self._exact: dict[str, ModelConfig] = {}
        self._patterns: list[tuple[Glob, ModelConfig]] = []
        for model in config.models:
            if model.is_pattern:
                self._patterns.append((compile_glob(model.name), model))
            else:
                self._exact[model.name] = model
            for alias in model.aliases:
                self._exact[alias] = model
        self._rules = [_Rule(rule) for rule in config.routes]
        self._families: dict[tuple[str, str], Family] = {}
        self._fallbacks = {m.name: self._fallback_groups(m) for m in config.models}
        self._overflow = {m.name: self._overflow_groups(m) for m in config.models}
        # Only a glob's own group depends on the requested name: plan the
        # groups of every other model (and its aliases) once.
        self._static: dict[str, tuple[ModelConfig, tuple[TargetGroup, ...]]] = {}
        # The whole plan, where nothing in it is drawn per request (no group
        # of two or more targets): what ``plan`` returns when no rule or tier
        # filter applies. Immutable, so one object serves every request.
        self._fixed: dict[str, RoutePlan] = {}
        # The same for a tier's filter: (id of the tier, name) -> (the tier,
        # its plan). Bounded: only names in ``_fixed``, tiers of this config.
        self._tier_plans: dict[tuple[int, str], tuple[Tier, RoutePlan]] = {}
        for name, model in self._exact.items():
            if not model.is_pattern:
                own = self._group(model, model.name)
                groups = _distinct((own, *self._fallbacks[model.name]))
                self._static[name] = (model, groups)
                if groups and all(len(g.targets) < 2 for g in groups):
                    self._fixed[name] = RoutePlan(
                        model.name, groups, model.retry, self._overflow[model.name]
                    )

    def find(self, name: str) -> ModelConfig | None:
        model = self._exact.get(name)
        if model is not None:
            return model
        for glob, pattern in self._patterns:
            if glob(name):
                return pattern
        return None

    def is_available(self, model: ModelConfig) -> bool:
        providers = self._config.providers
        return any(providers[t.provider].disabled_reason is None for t in model.targets)

    def listed_models(self) -> list[tuple[str, ModelConfig]]:
        """Names a client may call, for ``GET /v1/models``: exact names and
        aliases of models with at least one usable provider."""
        return [(name, m) for name, m in self._exact.items() if self.is_available(m)]

    def _group(self, model: ModelConfig, public: str) -> TargetGroup:
        targets = []
        for t in model.targets:
            prov = self._config.providers[t.provider]
            if prov.disabled_reason is not None:
                continue
            timeouts = replace(prov.timeouts, **model.timeouts) if model.timeouts else prov.timeouts
            name = t.model or public
            family = self._family(prov.name, name)
            targets.append(
                Target(
                    prov,
                    name,
                    t.weight,
                    timeouts,
                    public,
                    family.token_limit,
                    family.context_window,
                )
            )
        return TargetGroup(public, model.strategy, tuple(targets))

    def _family(self, provider: str, model: str) -> Family:
        """Cached: a glob model's targets are made per request."""
        key = (provider, model)
        found = self._families.get(key)
        if found is None:
            if len(self._families) > 4096:  # client-chosen names: keep it bounded
                self._families.clear()
            found = self._families[key] = family_of(self._config.families, provider, model)
        return found

    def _fallback_groups(self, model: ModelConfig) -> tuple[TargetGroup, ...]:
        order: list[ModelConfig] = []

        def visit(m: ModelConfig) -> None:  # depth first; config refuses loops
            for name in m.fallbacks:
                other = self._exact[name]
                if other is not model and other not in order:
                    order.append(other)
                    visit(other)

        visit(model)
        return tuple(self._group(m, m.name) for m in order)

    def _overflow_groups(self, model: ModelConfig) -> tuple[TargetGroup, ...]:
        """Each context-window fallback with its own fallbacks, in order."""
        out: list[TargetGroup] = []
        for name in model.context_window_fallbacks:
            other = self._exact[name]
            out += (self._group(other, other.name), *self._fallbacks[other.name])
        return tuple(out)

    def _redirect(
        self, requested: str, headers: Mapping[str, str], tenant: str | None, tier: str | None
    ) -> RouteRule | None:
        for rule in self._rules:
            if rule.matches(requested, headers, tenant, tier):
                return rule.rule
        return None

    def plan(
        self,
        requested: str,
        headers: Mapping[str, str],
        tenant: str | None = None,
        tier: str | None = None,
        access: Tier | None = None,
    ) -> RoutePlan:
        """The route plan of a request. ``access``, the caller's tier (None:
        every model), is asked of the requested model before the providers'
        state is looked at, so a key is told what its tier may use, not which
        server setting is missing; then of every fallback, and the groups it
        refuses are left out of the plan. A plan with nothing drawn per
        request is kept for the next request of the same tier object."""
        if self._rules or (fixed := self._fixed.get(requested)) is None:
            return self._build(requested, headers, tenant, tier, access)
        if access is None:
            return fixed
        kept = self._tier_plans.get((id(access), requested))
        if kept is not None and kept[0] is access:
            return kept[1]
        plan = self._build(requested, headers, tenant, tier, access)
        # Nothing drawn: the groups are a subset of ``_fixed``'s.
        self._tier_plans[(id(access), requested)] = (access, plan)
        return plan

    def _build(
        self,
        requested: str,
        headers: Mapping[str, str],
        tenant: str | None,
        tier: str | None,
        access: Tier | None,
    ) -> RoutePlan:
        rule = self._redirect(requested, headers, tenant, tier) if self._rules else None
        public = rule.model if rule is not None else requested
        static = self._static.get(public)
        if static is not None:
            model, groups = static
            public = model.name  # aliases bill and report as their model
        else:
            found = self.find(public)
            if found is None:
                raise ModelNotFound(
                    f"The model '{requested}' does not exist or you do not have access to it.",
                    param="model",
                )
            model = found  # a glob, or an alias of one: its own group serves this name
            groups = _distinct((self._group(model, public), *self._fallbacks[model.name]))
        overflow = self._overflow[model.name]
        if access is not None:
            if not access.allows(public):
                raise _not_allowed(tier, public)
            usable = tuple(g for g in groups if access.allows(g.model))
            overflow = tuple(g for g in overflow if access.allows(g.model))
            if groups and not usable:
                raise _not_allowed(tier, public)
            groups = usable
        if not groups:
            providers = self._config.providers
            reasons = [providers[t.provider].disabled_reason for t in model.targets]
            raise ProviderNotConfigured(
                f"The model '{requested}' is not available: {'; '.join(filter(None, reasons))}."
            )
        retry = rule.retry if rule is not None and rule.retry is not None else model.retry
        return RoutePlan(
            public_model=public, groups=self._draw(groups), retry=retry, overflow=overflow
        )

    def _draw(self, groups: tuple[TargetGroup, ...]) -> tuple[TargetGroup, ...]:
        """Each group in weighted order (a group of one needs no draw)."""
        if all(len(g.targets) < 2 for g in groups):
            return groups
        return tuple(
            g
            if len(g.targets) < 2
            else TargetGroup(g.model, g.strategy, _weighted_order(g.targets, self._rng))
            for g in groups
        )


def _not_allowed(tier: str | None, model: str) -> ModelNotAllowed:
    return ModelNotAllowed(
        f"Your tier '{tier}' does not have access to the model '{model}'.", param="model"
    )


def fit(plan: RoutePlan, need: int) -> RoutePlan:
    """The plan without the targets whose context window is smaller than
    ``need`` (prompt estimate + completion budget), with the model's
    ``context_window_fallbacks`` after them once a target was left out.
    Raises 400 ``context_length_exceeded`` when no target remains."""
    if all(t.context_window is None or t.context_window >= need for t in plan.targets):
        return plan
    kept = _fits(plan.groups, need)
    seen = {t.key for g in kept for t in g.targets}
    extra = _fits(plan.overflow, need)
    kept += tuple(
        replace(g, targets=fresh)
        for g in extra
        if (fresh := tuple(t for t in g.targets if t.key not in seen))
    )
    if not kept:
        window = max(t.context_window or 0 for t in plan.targets)
        raise ContextLengthExceeded(
            f"This model's maximum context length is {window} tokens. However, you requested "
            f"about {need} tokens (the prompt and the completion limit). Please reduce the "
            "length of the messages or the completion.",
            param="messages",
        )
    return replace(plan, groups=kept)


def _fits(groups: tuple[TargetGroup, ...], need: int) -> tuple[TargetGroup, ...]:
    out = []
    for g in groups:
        ok = tuple(t for t in g.targets if t.context_window is None or t.context_window >= need)
        if ok:
            out.append(g if len(ok) == len(g.targets) else replace(g, targets=ok))
    return tuple(out)


def _distinct(groups: tuple[TargetGroup, ...]) -> tuple[TargetGroup, ...]:
    """The groups without a target already in an earlier group, nor empty groups."""
    seen: set[str] = set()
    out = []
    for group in groups:
        fresh = tuple(t for t in group.targets if t.key not in seen)
        seen.update(t.key for t in fresh)
        if fresh:
            out.append(group if len(fresh) == len(group.targets) else replace(group, targets=fresh))
    return tuple(out)
