"""Reading YAML values strictly, each with the key path an error names.

``Node`` wraps a parsed YAML value and its path (``models[3].targets[0]``);
its typed accessors refuse anything unexpected with a ``ConfigError`` that
starts with that path, so every config module reports errors the same way.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from proxy.config import sealed

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}")


class ConfigError(ValueError):
    """A config problem, always prefixed with the key path it concerns."""


def glob_match(pattern: str, value: str) -> bool:
    return fnmatch.fnmatchcase(value, pattern)


Glob = Callable[[str], object]  # a compiled glob: truthy when it matches


def compile_glob(pattern: str) -> Glob:
    """``glob_match(pattern, ·)`` compiled once, for globs tried per request."""
    return re.compile(fnmatch.translate(pattern)).match


def boolean(value: Any, path: str) -> bool:
    """Plain-value checks for sections read key by key (the stages' own);
    ``Node`` offers the same on a path-carrying wrapper."""
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: must be true or false")
    return value


def positive_number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{path}: must be a number > 0")
    return float(value)


def one_of(value: Any, path: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{path}: must be one of: {', '.join(allowed)}")
    return str(value)


def mapping(
    raw: Any, path: str, allowed: tuple[str, ...], shape: str = "must be a mapping"
) -> dict[Any, Any]:
    """``raw`` as a mapping of ``allowed`` keys only: ``Node.mapping`` for
    sections read as plain values. ``shape``: what the error says it must be."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {shape}")
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{path}.{key}: unknown key (allowed: {', '.join(allowed)})")
    return raw


class Node:
    """A YAML value plus its key path, with strict typed accessors."""

    def __init__(self, value: Any, path: str) -> None:
        self.value = value
        self.path = path

    def fail(self, msg: str) -> ConfigError:
        return ConfigError(f"{self.path or '<root>'}: {msg}")

    def mapping(self, allowed: tuple[str, ...]) -> dict[str, Node]:
        if not isinstance(self.value, dict):
            raise self.fail("must be a mapping")
        out = {}
        for key, val in self.value.items():
            sub = f"{self.path}.{key}" if self.path else str(key)
            if key not in allowed:
                raise ConfigError(f"{sub}: unknown key (allowed: {', '.join(allowed)})")
            out[key] = Node(val, sub)
        return out

    def items(self) -> Iterator[Node]:
        if not isinstance(self.value, list):
            raise self.fail("must be a list")
        for i, val in enumerate(self.value):
            yield Node(val, f"{self.path}[{i}]")

    def string(self) -> str:
        if not isinstance(self.value, str) or not self.value:
            raise self.fail("must be a non-empty string")
        return self.value

    def number(self, *, positive: bool = False) -> float:
        if isinstance(self.value, bool) or not isinstance(self.value, int | float):
            raise self.fail("must be a number")
        if positive and not self.value > 0:
            raise self.fail("must be > 0")
        return float(self.value)

    def integer(self, *, positive: bool = False) -> int:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise self.fail("must be an integer")
        if positive and self.value <= 0:
            raise self.fail("must be > 0")
        return self.value

    def boolean(self) -> bool:
        if not isinstance(self.value, bool):
            raise self.fail("must be true or false")
        return self.value

    def string_map(self) -> dict[str, str]:
        if not isinstance(self.value, dict):
            raise self.fail("must be a mapping")
        out = {}
        for k, v in self.value.items():
            if not isinstance(v, str | int | float) or isinstance(v, bool):
                raise ConfigError(f"{self.path}.{k}: must be a string")
            out[str(k)] = str(v)
        return out


def resolve_env(value: Any, path: str, env: Mapping[str, str]) -> Any:
    """Replace ``${VAR}``/``${VAR:-default}`` in every string, recursively,
    then open the values sealed with the master key (``enc:...``)."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, has_default, default = m.group(1), m.group(2), m.group(3)
            if name in env:
                return env[name]
            if has_default is not None:
                return default or ""
            raise ConfigError(f"{path}: environment variable {name} is not set")

        text = ENV_REF.sub(sub, value)
        if not sealed.is_sealed(text):
            return text
        try:
            return sealed.open_sealed(text, env.get(sealed.MASTER_KEY_ENV))
        except sealed.SealError as exc:
            raise ConfigError(f"{path}: sealed value {exc}") from None
    if isinstance(value, dict):
        return {k: resolve_env(v, f"{path}.{k}" if path else str(k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_env(v, f"{path}[{i}]", env) for i, v in enumerate(value)]
    return value
