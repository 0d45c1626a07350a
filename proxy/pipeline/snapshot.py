"""An immutable, compiled view of one config version.

A request reads ``ConfigStore.current`` once and uses that snapshot from
start to end, so a reload (which swaps the whole snapshot in one assignment)
never mixes two configs inside one request, and in-flight streams finish on
the snapshot they started with.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.config.model import Config
from proxy.core import redact
from proxy.core.trace import NO_TRACER, Tracer
from proxy.providers import Provider, build_provider
from proxy.providers.pool import Pool
from proxy.stages.base import Stage, overrides
from proxy.stages.route import Router

Enabled = tuple[tuple[Stage, Any], ...]  # (stage, its settings), in registry order


@dataclass(frozen=True, slots=True)
class Hooks:
    """Per hook, the stages that implement it and are on in this config: the
    pipeline loops over these, so an absent feature costs nothing."""

    request: Enabled = ()
    answer: Enabled = ()
    reply: Enabled = ()
    stream: Enabled = ()
    settle: Enabled = ()


def hooks_for(config: Config, stages: Sequence[Stage]) -> Hooks:
    on = [
        (stage, config.section(stage.section) if stage.section else None)
        for stage in stages
        if stage.section is None or config.section(stage.section) is not None
    ]

    def having(hook: str) -> Enabled:
        return tuple((stage, settings) for stage, settings in on if overrides(stage, hook))

    return Hooks(
        request=having("on_request"),
        answer=having("on_answer"),
        reply=having("on_reply"),
        stream=having("on_stream"),
        settle=having("on_settle"),
    )


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: Config
    router: Router
    providers: Mapping[str, Provider]
    hooks: Hooks = field(default_factory=Hooks)
    tracer: Tracer = NO_TRACER  # the tracing stage's when ``tracing:`` is on
    loaded_at: float = field(default_factory=time.time)


def build_snapshot(config: Config, client: Pool, stages: Sequence[Stage] = ()) -> Snapshot:
    redact.remember_config(config)  # its provider keys are scrubbed from every log line
    providers = {name: build_provider(cfg, client) for name, cfg in config.providers.items()}
    hooks = hooks_for(config, stages)
    return Snapshot(config, Router(config), providers, hooks, tracer_for(config, stages))


def tracer_for(config: Config, stages: Sequence[Stage]) -> Tracer:
    """The first enabled stage's tracer, else the no-op one."""
    for stage in stages:
        settings = config.section(stage.section) if stage.section else None
        if settings is not None and (found := stage.tracer(settings)) is not None:
            return found
    return NO_TRACER


class ConfigStore:
    """Holds the live snapshot; ``swap`` replaces it atomically. ``stages``
    are the app's stage instances, which every new snapshot is built with."""

    def __init__(self, snapshot: Snapshot, stages: Sequence[Stage] = ()) -> None:
        self.current = snapshot
        self.stages = tuple(stages)

    def swap(self, snapshot: Snapshot) -> None:
        self.current = snapshot
