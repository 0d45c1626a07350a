"""Load ``tollway.yaml`` into a frozen, validated ``Config``.

Strict by design: unknown keys, unknown provider references, bad weights and
duplicate names are refused at load, and every message names the key path
(``models[3].targets[0].weight: must be > 0``) so an admin can fix the file
without reading code. ``${VAR}`` references are resolved here; an unset
variable is an error unless written ``${VAR:-default}``. Secrets never appear
in an error message: only key paths and variable names do.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from proxy.config.batches import BatchPolicy, parse_batches
from proxy.config.families import DEFAULT_FAMILIES, Family, parse_families
from proxy.config.logging import LogPolicy, parse_logging
from proxy.config.ratelimit import RateLimitPolicy, parse_ratelimit
from proxy.config.reader import ENV_REF, ConfigError, Node, resolve_env
from proxy.config.tiers import (
    BillingPolicy,
    Price,
    Tier,
    parse_billing,
    parse_prices,
    parse_tiers,
)

PROVIDER_KINDS = ("echo", "openai", "azure", "anthropic", "gemini")
_PROVIDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 10.0
    first_byte: float = 120.0
    idle: float = 120.0
    total: float = 600.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How the forward stage retries one request (``retry:`` at top level, per
    model, per route rule; each level overrides the keys it names)."""

    max_attempts: int = 3  # provider requests in all, fallbacks included
    backoff_base_ms: float = 250.0  # a retry of a target waits U(0, min(max, base * 2^n))
    backoff_max_ms: float = 8000.0
    deadline_s: float = 600.0  # bounds all attempts and waits, up to the first byte
    retry_on_429: bool = True


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When a provider's targets are ejected (``providers.<name>.breaker``)."""

    failures: int = 5  # consecutive failures that eject a target
    cooldown_s: float = 10.0  # first ejection; doubles with each repeated one
    max_cooldown_s: float = 300.0
    trip_on_429: bool = False


STRATEGIES = ("weighted", "least_in_flight")


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    kind: str
    base_url: str = ""
    api_key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeouts: Timeouts = field(default_factory=Timeouts)
    api_version: str | None = None
    default_max_tokens: int = 4096
    # Why a provider is unusable (e.g. its key's env var is empty), else None.
    disabled_reason: str | None = None
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    # ``kind: openai`` only: whether the upstream serves OpenAI's Responses
    # API (``POST /responses``), so the Responses door may pass requests
    # through to it. Default: only for OpenAI itself (api.openai.com);
    # OpenAI-compatible servers mostly lack it, so they opt in.
    responses: bool = False


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


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 4 * 1024 * 1024
    # After SIGTERM: how long in-flight requests and streams may take to finish.
    shutdown_grace_s: float = 120.0
    watch_config: bool = True  # reload when the file changes (else SIGHUP / POST /admin/reload)
    # Read when the server starts (a reload does not change them): see http_guard.
    header_timeout_s: float = 10.0  # connection start (or a next request's first byte) to headers
    body_timeout_s: float = 30.0  # end of the headers to end of the body
    max_connections: int = 10_000  # open connections per worker
    # Peers whose X-Forwarded-For names the client (its right-most untrusted address).
    trusted_proxies: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    auth: str
    providers: Mapping[str, ProviderConfig]
    models: tuple[ModelConfig, ...]
    routes: tuple[RouteRule, ...]
    version: str  # short hash of the source text, shown by /admin/config later
    tiers: Mapping[str, Tier] = field(default_factory=dict)
    prices: Mapping[str, Price] = field(default_factory=dict)
    families: tuple[Family, ...] = DEFAULT_FAMILIES  # the YAML's, then the shipped ones
    billing: BillingPolicy | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    ratelimit: RateLimitPolicy | None = None  # always set by parse_config
    logging: LogPolicy = field(default_factory=LogPolicy)
    batches: BatchPolicy = field(default_factory=BatchPolicy)
    # What each stage's own section configured (proxy.stages.base.Stage.configure),
    # by section name; a stage whose section is absent or off is not here.
    sections: Mapping[str, object] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)  # sections owned by later stages

    def section(self, name: str) -> object | None:
        return self.sections.get(name)


def _timeout_overrides(node: Node) -> dict[str, float]:
    m = node.mapping(("connect", "first_byte", "idle", "total"))
    return {k: v.number(positive=True) for k, v in m.items()}


def _timeouts(node: Node) -> Timeouts:
    return Timeouts(**_timeout_overrides(node))


def _retry(node: Node, base: RetryPolicy) -> RetryPolicy:
    kw: dict[str, Any] = {}
    for key, val in node.mapping(tuple(RetryPolicy.__dataclass_fields__)).items():
        if key == "max_attempts":
            kw[key] = val.integer(positive=True)
        elif key == "retry_on_429":
            kw[key] = val.boolean()
        elif key == "deadline_s":
            kw[key] = val.number(positive=True)
        elif val.number() < 0:
            raise val.fail("must be >= 0")
        else:
            kw[key] = val.number()
    policy = replace(base, **kw)
    if policy.backoff_max_ms < policy.backoff_base_ms:
        raise node.fail("backoff_max_ms must be >= backoff_base_ms")
    return policy


def _breaker(node: Node) -> BreakerPolicy:
    kw: dict[str, Any] = {}
    for key, val in node.mapping(tuple(BreakerPolicy.__dataclass_fields__)).items():
        if key == "failures":
            kw[key] = val.integer(positive=True)
        else:
            kw[key] = val.boolean() if key == "trip_on_429" else val.number(positive=True)
    policy = BreakerPolicy(**kw)
    if policy.max_cooldown_s < policy.cooldown_s:
        raise node.fail("max_cooldown_s must be >= cooldown_s")
    return policy


def _provider(name: str, node: Node, raw: Any) -> ProviderConfig:
    m = node.mapping(
        (
            "kind",
            "base_url",
            "api_key",
            "headers",
            "timeouts",
            "api_version",
            "default_max_tokens",
            "breaker",
            "responses",
        )
    )
    if "kind" not in m:
        raise node.fail("missing key 'kind'")
    kind = m["kind"].string()
    if kind not in PROVIDER_KINDS:
        raise m["kind"].fail(f"unknown provider kind {kind!r} (known: {', '.join(PROVIDER_KINDS)})")
    base_url = m["base_url"].string().rstrip("/") if "base_url" in m else ""
    if kind != "echo" and not base_url:
        raise node.fail("missing key 'base_url'")
    if base_url and not base_url.startswith(("http://", "https://")):
        raise m["base_url"].fail("must start with http:// or https://")
    api_key = None
    disabled = None
    if "api_key" in m:
        if not isinstance(m["api_key"].value, str):
            raise m["api_key"].fail("must be a string")
        api_key = m["api_key"].value
        if not api_key:
            ref = ENV_REF.search(raw.get("api_key", "")) if isinstance(raw, dict) else None
            hint = f"set {ref.group(1)}" if ref else "set api_key"
            disabled = f"provider '{name}' has no API key ({hint})"
    return ProviderConfig(
        name=name,
        kind=kind,
        base_url=base_url,
        api_key=api_key,
        headers=m["headers"].string_map() if "headers" in m else {},
        timeouts=_timeouts(m["timeouts"]) if "timeouts" in m else Timeouts(),
        api_version=m["api_version"].string() if "api_version" in m else None,
        default_max_tokens=(
            m["default_max_tokens"].integer(positive=True) if "default_max_tokens" in m else 4096
        ),
        disabled_reason=disabled,
        breaker=_breaker(m["breaker"]) if "breaker" in m else BreakerPolicy(),
        responses=_responses(kind, base_url, m),
    )


def _responses(kind: str, base_url: str, m: Mapping[str, Node]) -> bool:
    if "responses" not in m:
        return kind == "openai" and urlsplit(base_url).hostname == "api.openai.com"
    if kind != "openai":
        raise m["responses"].fail("is only for providers of kind 'openai'")
    return m["responses"].boolean()


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
    targets = []
    for t in m["targets"].items():
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
        raise m["targets"].fail("must list at least one target")
    aliases = tuple(a.string() for a in m["aliases"].items()) if "aliases" in m else ()
    strategy = m["strategy"].string() if "strategy" in m else "weighted"
    if strategy not in STRATEGIES:
        raise m["strategy"].fail(f"must be one of: {', '.join(STRATEGIES)}")
    return ModelConfig(
        name=m["name"].string(),
        targets=tuple(targets),
        aliases=aliases,
        owned_by=m["owned_by"].string() if "owned_by" in m else "tollway",
        strategy=strategy,
        fallbacks=tuple(f.string() for f in m["fallbacks"].items()) if "fallbacks" in m else (),
        context_window_fallbacks=(
            tuple(f.string() for f in m["context_window_fallbacks"].items())
            if "context_window_fallbacks" in m
            else ()
        ),
        retry=_retry(m["retry"], retry) if "retry" in m else retry,
        timeouts=_timeout_overrides(m["timeouts"]) if "timeouts" in m else {},
    )


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
        retry=_retry(m["retry"], model_retry[target]) if "retry" in m else None,
    )


_SERVER_KEYS = (
    "host",
    "port",
    "max_body_bytes",
    "shutdown_grace_s",
    "watch_config",
    "header_timeout_s",
    "body_timeout_s",
    "max_connections",
    "trusted_proxies",
)


def _trusted_proxies(node: Node) -> tuple[str, ...]:
    out = []
    for item in node.items():
        try:
            out.append(str(ipaddress.ip_network(item.string(), strict=False)))
        except ValueError:
            raise item.fail("must be an IP address or network (10.0.0.0/8, ::1)") from None
    return tuple(out)


def _server(node: Node) -> ServerConfig:
    m = node.mapping(_SERVER_KEYS)
    grace = m["shutdown_grace_s"].number() if "shutdown_grace_s" in m else 120.0
    if grace < 0:
        raise m["shutdown_grace_s"].fail("must be >= 0")
    d = ServerConfig()
    return ServerConfig(
        header_timeout_s=(
            m["header_timeout_s"].number(positive=True)
            if "header_timeout_s" in m
            else d.header_timeout_s
        ),
        body_timeout_s=(
            m["body_timeout_s"].number(positive=True) if "body_timeout_s" in m else d.body_timeout_s
        ),
        max_connections=(
            m["max_connections"].integer(positive=True)
            if "max_connections" in m
            else d.max_connections
        ),
        trusted_proxies=(_trusted_proxies(m["trusted_proxies"]) if "trusted_proxies" in m else ()),
        host=m["host"].string() if "host" in m else "127.0.0.1",
        port=m["port"].integer(positive=True) if "port" in m else 8080,
        max_body_bytes=(
            m["max_body_bytes"].integer(positive=True) if "max_body_bytes" in m else 4 << 20
        ),
        shutdown_grace_s=grace,
        watch_config=m["watch_config"].boolean() if "watch_config" in m else True,
    )


# Sections validated by the stages that own them (billing, cache, ...); the
# core only checks they are mappings or lists so a typo at top level is caught.
_LATER_SECTIONS: tuple[str, ...] = ()
# validated by proxy.config.ratelimit, proxy.config.logging and proxy.config.batches
_SHARED_SECTIONS = ("ratelimit", "logging", "batches")
_BILLING_SECTIONS = ("tiers", "prices", "billing")
_TOP = (
    "server",
    "auth",
    "providers",
    "models",
    "routes",
    "retry",
    "model_families",
    *_BILLING_SECTIONS,
    *_SHARED_SECTIONS,
    *_LATER_SECTIONS,
)


def _providers(resolved: Mapping[str, Node], root: Mapping[str, Node]) -> dict[str, ProviderConfig]:
    if "providers" not in resolved:
        raise ConfigError("providers: missing (at least one provider is required)")
    pnode = resolved["providers"]
    if not isinstance(pnode.value, dict) or not pnode.value:
        raise pnode.fail("must be a non-empty mapping of name -> provider")
    for name in pnode.value:
        if not isinstance(name, str) or not _PROVIDER_NAME.fullmatch(name):
            raise ConfigError(
                f"providers.{name}: a provider name is 1-64 letters, digits, '.', '_' or '-' "
                "(it goes into headers, metrics labels and 'provider/model' target keys)"
            )
    return {
        name: _provider(name, Node(val, f"providers.{name}"), root["providers"].value.get(name))
        for name, val in pnode.value.items()
    }


def _models(
    resolved: Mapping[str, Node], providers: Mapping[str, ProviderConfig], retry: RetryPolicy
) -> tuple[ModelConfig, ...]:
    models: list[ModelConfig] = []
    seen: dict[str, str] = {}
    for node in resolved["models"].items() if "models" in resolved else iter(()):
        model = _model(node, providers, retry)
        for n in (model.name, *model.aliases):
            if n in seen:
                raise ConfigError(f"{node.path}: duplicate model name {n!r} (also {seen[n]})")
            seen[n] = node.path
        models.append(model)
    _check_fallbacks(models)
    return tuple(models)


@dataclass(frozen=True, slots=True)
class Section:
    """A top-level key owned by a stage: ``read`` validates it (``raw`` is None
    when absent) and returns the stage's settings, or None for "off"."""

    name: str
    read: Callable[[Any, Config], object | None]


def parse_config(
    text: str, env: Mapping[str, str] | None = None, sections: Sequence[Section] = ()
) -> Config:
    """Validate YAML text into a ``Config``; raise ``ConfigError`` naming the key path.

    ``sections``: the stages' own top-level keys (``proxy.pipeline.registry``
    passes them); any other unknown key is refused.
    """
    top = (*_TOP, *(s.name for s in sections))
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"<root>: invalid YAML{where}") from None
    if raw is None:
        raise ConfigError("<root>: the file is empty")
    root = Node(raw, "").mapping(top)
    resolved = Node(resolve_env(raw, "", os.environ if env is None else env), "").mapping(top)

    providers = _providers(resolved, root)
    retry = _retry(resolved["retry"], RetryPolicy()) if "retry" in resolved else RetryPolicy()
    models = _models(resolved, providers, retry)

    model_retry = {n: m.retry for m in models for n in (m.name, *m.aliases)}
    routes = tuple(
        _route(node, model_retry)
        for node in (resolved["routes"].items() if "routes" in resolved else ())
    )
    auth = resolved["auth"].string() if "auth" in resolved else "keys"
    if auth not in ("none", "keys"):
        raise resolved["auth"].fail("must be 'none' or 'keys'")
    extra = {k: resolved[k].value for k in _LATER_SECTIONS if k in resolved}

    raw_of = {k: resolved[k].value if k in resolved else None for k in _BILLING_SECTIONS}
    config = Config(
        tiers=parse_tiers(raw_of["tiers"]),
        prices=parse_prices(raw_of["prices"]),
        families=parse_families(
            resolved["model_families"].value if "model_families" in resolved else None
        ),
        billing=parse_billing(raw_of["billing"]),
        server=_server(resolved["server"]) if "server" in resolved else ServerConfig(),
        auth=auth,
        providers=providers,
        models=models,
        routes=routes,
        retry=retry,
        version=hashlib.sha256(text.encode()).hexdigest()[:12],
        ratelimit=parse_ratelimit(
            resolved["ratelimit"].value if "ratelimit" in resolved else None, providers
        ),
        logging=parse_logging(resolved["logging"].value if "logging" in resolved else None),
        batches=parse_batches(resolved["batches"].value if "batches" in resolved else None),
        extra=extra,
    )
    owned = {
        s.name: s.read(resolved[s.name].value if s.name in resolved else None, config)
        for s in sections
    }
    return replace(config, sections={k: v for k, v in owned.items() if v is not None})


def load_config(
    path: str | Path, env: Mapping[str, str] | None = None, sections: Sequence[Section] = ()
) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    return parse_config(text, env, sections)
