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
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from proxy.config.batches import BatchPolicy, parse_batches
from proxy.config.families import DEFAULT_FAMILIES, Family, parse_families
from proxy.config.logging import LogPolicy, parse_logging

# The section types stay importable from here, where the package reads them.
from proxy.config.providers import BreakerPolicy as BreakerPolicy
from proxy.config.providers import ProviderConfig, parse_providers
from proxy.config.providers import Timeouts as Timeouts
from proxy.config.ratelimit import RateLimitPolicy, parse_ratelimit
from proxy.config.reader import ConfigError, Node, resolve_env
from proxy.config.retry import RetryPolicy, parse_retry
from proxy.config.routing import ModelConfig, RouteRule, parse_models, parse_routes
from proxy.config.server import ServerConfig, parse_server
from proxy.config.tiers import (
    BillingPolicy,
    Price,
    Tier,
    parse_billing,
    parse_prices,
    parse_tiers,
)


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
    passes them); any other unknown key is refused. The sections are read in
    a fixed order (a file with two mistakes names the same one first each time).
    """
    top = (*_TOP, *(s.name for s in sections))
    raw = _yaml(text)
    root = Node(raw, "").mapping(top)
    resolved = Node(resolve_env(raw, "", os.environ if env is None else env), "").mapping(top)

    def value(name: str) -> Any:
        return resolved[name].value if name in resolved else None

    providers = parse_providers(resolved.get("providers"), root.get("providers"))
    retry = parse_retry(resolved["retry"], RetryPolicy()) if "retry" in resolved else RetryPolicy()
    models = parse_models(resolved.get("models"), providers, retry)
    config = Config(
        providers=providers,
        retry=retry,
        models=models,
        routes=parse_routes(resolved.get("routes"), models),
        auth=_auth(resolved.get("auth")),
        tiers=parse_tiers(value("tiers")),
        prices=parse_prices(value("prices")),
        families=parse_families(value("model_families")),
        billing=parse_billing(value("billing")),
        server=parse_server(resolved["server"]) if "server" in resolved else ServerConfig(),
        ratelimit=parse_ratelimit(value("ratelimit"), providers),
        logging=parse_logging(value("logging")),
        batches=parse_batches(value("batches")),
        extra={k: resolved[k].value for k in _LATER_SECTIONS if k in resolved},
        version=hashlib.sha256(text.encode()).hexdigest()[:12],
    )
    owned = {s.name: s.read(value(s.name), config) for s in sections}
    return replace(config, sections={k: v for k, v in owned.items() if v is not None})


def _yaml(text: str) -> Any:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"<root>: invalid YAML{where}") from None
    if raw is None:
        raise ConfigError("<root>: the file is empty")
    return raw


def _auth(node: Node | None) -> str:
    auth = node.string() if node is not None else "keys"
    if node is not None and auth not in ("none", "keys"):
        raise node.fail("must be 'none' or 'keys'")
    return auth


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
