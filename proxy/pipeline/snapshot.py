"""An immutable, compiled view of one config version.

A request reads ``ConfigStore.current`` once and uses that snapshot from
start to end, so a reload (which swaps the whole snapshot in one assignment)
never mixes two configs inside one request, and in-flight streams finish on
the snapshot they started with.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp

from proxy.config.model import Config
from proxy.core import redact
from proxy.providers import Provider, build_provider
from proxy.stages.route import Router


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: Config
    router: Router
    providers: Mapping[str, Provider]
    loaded_at: float = field(default_factory=time.time)


def build_snapshot(config: Config, session: aiohttp.ClientSession) -> Snapshot:
    redact.remember_config(config)  # its provider keys are scrubbed from every log line
    providers = {name: build_provider(cfg, session) for name, cfg in config.providers.items()}
    return Snapshot(config=config, router=Router(config), providers=providers)


class ConfigStore:
    """Holds the live snapshot; ``swap`` replaces it atomically."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.current = snapshot

    def swap(self, snapshot: Snapshot) -> None:
        self.current = snapshot
