"""The ``providers:`` section: each upstream, its timeouts and its breaker."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from proxy.config.reader import ENV_REF, ConfigError, Node

PROVIDER_KINDS = ("echo", "openai", "azure", "anthropic", "gemini")
_PROVIDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 10.0
    first_byte: float = 120.0
    idle: float = 120.0
    total: float = 600.0


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When a provider's targets are ejected (``providers.<name>.breaker``)."""

    failures: int = 5  # consecutive failures that eject a target
    cooldown_s: float = 10.0  # first ejection; doubles with each repeated one
    max_cooldown_s: float = 300.0
    trip_on_429: bool = False


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


def timeout_overrides(node: Node) -> dict[str, float]:
    m = node.mapping(("connect", "first_byte", "idle", "total"))
    return {k: v.number(positive=True) for k, v in m.items()}


def _timeouts(node: Node) -> Timeouts:
    return Timeouts(**timeout_overrides(node))


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
    api_key, disabled = _api_key(name, m, raw)
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


def _api_key(name: str, m: Mapping[str, Node], raw: Any) -> tuple[str | None, str | None]:
    """The key, and why the provider is disabled when it resolved empty
    (naming the variable the file refers to, never a value)."""
    if "api_key" not in m:
        return None, None
    if not isinstance(m["api_key"].value, str):
        raise m["api_key"].fail("must be a string")
    api_key: str = m["api_key"].value
    if api_key:
        return api_key, None
    ref = ENV_REF.search(raw.get("api_key", "")) if isinstance(raw, dict) else None
    hint = f"set {ref.group(1)}" if ref else "set api_key"
    return api_key, f"provider '{name}' has no API key ({hint})"


def _responses(kind: str, base_url: str, m: Mapping[str, Node]) -> bool:
    if "responses" not in m:
        return kind == "openai" and urlsplit(base_url).hostname == "api.openai.com"
    if kind != "openai":
        raise m["responses"].fail("is only for providers of kind 'openai'")
    return m["responses"].boolean()


def parse_providers(pnode: Node | None, raw: Node | None) -> dict[str, ProviderConfig]:
    """``pnode``: the section, ``${VAR}`` resolved; ``raw``: as written (an
    empty key names the variable to set)."""
    if pnode is None or raw is None:
        raise ConfigError("providers: missing (at least one provider is required)")
    if not isinstance(pnode.value, dict) or not pnode.value:
        raise pnode.fail("must be a non-empty mapping of name -> provider")
    for name in pnode.value:
        if not isinstance(name, str) or not _PROVIDER_NAME.fullmatch(name):
            raise ConfigError(
                f"providers.{name}: a provider name is 1-64 letters, digits, '.', '_' or '-' "
                "(it goes into headers, metrics labels and 'provider/model' target keys)"
            )
    return {
        name: _provider(name, Node(val, f"providers.{name}"), raw.value.get(name))
        for name, val in pnode.value.items()
    }
