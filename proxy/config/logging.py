"""The ``logging:`` section: the access log line and whose bodies it holds.

logging:
  access_log: true            # default
  bodies:
    tenants: [acme-debug]     # globs; prompts and completions in their lines
    max_chars: 4000           # each text cut to this length
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.config.reader import ConfigError, glob_match, mapping


@dataclass(frozen=True, slots=True)
class LogPolicy:
    access_log: bool = True
    body_tenants: tuple[str, ...] = ()  # globs of tenants whose bodies are logged
    body_max_chars: int = 4000

    def logs_bodies(self, tenant: str | None) -> bool:
        return tenant is not None and any(glob_match(p, tenant) for p in self.body_tenants)


def parse_logging(raw: Any) -> LogPolicy:
    if raw is None:
        return LogPolicy()
    mapping(raw, "logging", ("access_log", "bodies"))
    access = raw.get("access_log", True)
    if not isinstance(access, bool):
        raise ConfigError("logging.access_log: must be true or false")
    bodies = raw.get("bodies") or {}
    mapping(bodies, "logging.bodies", ("tenants", "max_chars"))
    tenants = bodies.get("tenants", [])
    if not isinstance(tenants, list) or not all(isinstance(t, str) and t for t in tenants):
        raise ConfigError("logging.bodies.tenants: must be a list of tenant names or globs")
    max_chars = bodies.get("max_chars", 4000)
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars <= 0:
        raise ConfigError("logging.bodies.max_chars: must be a positive integer")
    return LogPolicy(access, tuple(tenants), max_chars)
