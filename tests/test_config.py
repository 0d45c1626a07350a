"""Strict config: every refusal names the key path; secrets never leak."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config.model import ConfigError
from proxy.pipeline.registry import load_config, parse_config

BASE: dict[str, Any] = {
    "auth": "none",
    "providers": {
        "p": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1", "api_key": "${P_KEY}"}
    },
    "models": [{"name": "m", "targets": [{"provider": "p", "weight": 2}]}],
}
ENV = {"P_KEY": "sk-secret-value"}


def _parse(cfg: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    return parse_config(yaml.safe_dump(cfg), ENV if env is None else env)


def _broken(path: list[Any], value: Any) -> dict[str, Any]:
    cfg = yaml.safe_load(yaml.safe_dump(BASE))
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return cfg


def test_valid_config_resolves_env() -> None:
    cfg = _parse(BASE)
    assert cfg.providers["p"].api_key == "sk-secret-value"
    assert cfg.models[0].targets[0].weight == 2.0


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["models", 0, "targets", 0, "weight"], 0, "models[0].targets[0].weight: must be > 0"),
        (
            ["models", 0, "targets", 0, "weight"],
            "heavy",
            "models[0].targets[0].weight: must be a number",
        ),
        (
            ["models", 0, "targets", 0, "provider"],
            "nope",
            "models[0].targets[0].provider: unknown provider 'nope'",
        ),
        (["models", 0, "colour"], "red", "models[0].colour: unknown key"),
        (["providers", "p", "kind"], "mystery", "providers.p.kind: unknown provider kind"),
        (["providers", "p", "base_url"], "ftp://x", "providers.p.base_url: must start with http"),
        (
            ["providers", "p", "timeouts"],
            {"connect": -1},
            "providers.p.timeouts.connect: must be > 0",
        ),
        (["server"], {"port": "eighty"}, "server.port: must be an integer"),
        (["auth"], "maybe", "auth: must be 'none' or 'keys'"),
        (["modles"], [], "modles: unknown key"),
    ],
)
def test_invalid_configs_name_the_key_path(path: list[Any], value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _parse(_broken(path, value))
    assert str(exc.value).startswith(message)


@pytest.mark.parametrize("name", ["a/b", "x{y}", "bad\nname", "", "-dash", "n" * 65, 7])
def test_provider_names_that_would_break_keys_or_headers_are_refused(name: Any) -> None:
    provider = BASE["providers"]["p"]
    cfg = {**BASE, "providers": {name: provider}, "models": []}
    with pytest.raises(ConfigError, match=r"a provider name is 1-64 letters"):
        _parse(cfg)


def test_provider_names_may_use_dots_dashes_underscores() -> None:
    provider = BASE["providers"]["p"]
    cfg = {**BASE, "providers": {"azure-east_2.prod": provider}, "models": []}
    assert list(_parse(cfg).providers) == ["azure-east_2.prod"]


def test_duplicate_names_and_aliases_are_refused() -> None:
    cfg = _broken(
        ["models"],
        [
            {"name": "m", "targets": [{"provider": "p"}]},
            {"name": "n", "aliases": ["m"], "targets": [{"provider": "p"}]},
        ],
    )
    with pytest.raises(ConfigError, match=r"models\[1\]: duplicate model name 'm'"):
        _parse(cfg)


def test_unset_env_is_refused_without_leaking_values() -> None:
    with pytest.raises(ConfigError) as exc:
        _parse(BASE, env={})
    assert str(exc.value) == "providers.p.api_key: environment variable P_KEY is not set"


def test_optional_env_disables_provider() -> None:
    cfg = _parse(_broken(["providers", "p", "api_key"], "${P_KEY:-}"), env={})
    assert cfg.providers["p"].disabled_reason == "provider 'p' has no API key (set P_KEY)"


def test_route_to_unknown_model_is_refused() -> None:
    cfg = _broken(["routes"], [{"when": {"headers": {"x-a": "1"}}, "model": "ghost"}])
    with pytest.raises(ConfigError, match=r"routes\[0\].model: unknown model 'ghost'"):
        _parse(cfg)


@pytest.mark.parametrize("text", ["", "providers: [unclosed", "just a string"])
def test_empty_and_broken_files(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_config(text, {})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_shipped_config_is_valid() -> None:
    cfg = load_config(Path(__file__).parents[1] / "config" / "tollway.yaml", env={})
    assert any(m.name == "echo" for m in cfg.models)
    assert cfg.providers["openai"].disabled_reason is not None  # no key in env
